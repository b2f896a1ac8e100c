//! Where a tier's block bytes live: nowhere (a tier of metadata, for engines that simulate
//! their KV), a host-memory region, or a preallocated file whose header lists the block in
//! each slot, so that the disk tier's index is rebuilt when a worker restarts. Every byte
//! moves through a `turbine-transfer` agent's registered regions.
//!
//! The file: a 4 KiB header, then one 32-byte entry per slot (sequence hash, local hash,
//! parent hash, flags), then the slots' data, 4 KiB aligned. A slot's data is written
//! before its entry, and its entry cleared before the slot is reused, so that an entry
//! marked valid always describes the bytes in its slot, short of a crash the page cache
//! did not write back (the file is not synced per block: a lost tier costs recomputation,
//! and syncing would cost every offload a disk flush).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use turbine_tokens::BlockHash;
use turbine_transfer::{Agent, Desc, RegionId};

use crate::KvbmError;

const MAGIC: &[u8; 8] = b"TRBKVBM1";
const HEADER: u64 = 4096;
const ENTRY: u64 = 32;
const VALID: u64 = 1;
const HAS_PARENT: u64 = 2;

/// A block as a tier's index and a disk entry know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMeta {
    pub hash: BlockHash,
    pub parent: Option<u64>,
}

/// One block's bytes in a tier's region.
pub(crate) struct Source {
    pub(crate) agent: Arc<Agent>,
    pub(crate) region: RegionId,
    pub(crate) offset: u64,
}

pub(crate) enum Store {
    /// No bytes: the tier only tracks which blocks it would hold.
    Metadata,
    Host {
        agent: Arc<Agent>,
        region: RegionId,
    },
    Disk(DiskFile),
}

impl Store {
    pub(crate) fn host(agent: Arc<Agent>, slots: usize, block_bytes: usize) -> Result<Self, KvbmError> {
        let region = agent.register_host(slots as u64 * block_bytes as u64)?;
        Ok(Store::Host { agent, region })
    }

    /// The agent, region and offset of `slot`'s bytes; `None` for a tier of metadata.
    fn place(&self, slot: u32, block_bytes: usize) -> Option<(&Arc<Agent>, RegionId, u64)> {
        let (agent, region, base) = match self {
            Store::Metadata => return None,
            Store::Host { agent, region } => (agent, *region, 0),
            Store::Disk(d) => (&d.agent, d.region, d.data_start),
        };
        Some((agent, region, base + u64::from(slot) * block_bytes as u64))
    }

    /// Where `slot`'s bytes are, for a copy that runs on another thread; `None` for a tier
    /// of metadata.
    pub(crate) fn source(&self, slot: u32, block_bytes: usize) -> Option<Source> {
        self.place(slot, block_bytes).map(|(agent, region, offset)| Source {
            agent: agent.clone(),
            region,
            offset,
        })
    }

    /// Writes `pieces` (one block, in order) into `slot`, and for a disk its entry after.
    pub(crate) fn write(
        &self,
        slot: u32,
        block_bytes: usize,
        meta: &BlockMeta,
        pieces: &[&[u8]],
    ) -> Result<(), KvbmError> {
        let Some((agent, region, offset)) = self.place(slot, block_bytes) else {
            return Ok(());
        };
        check_len(pieces.iter().map(|p| p.len()).sum(), block_bytes)?;
        agent.write_local_pieces(region, offset, pieces)?;
        if let Store::Disk(d) = self {
            d.write_entry(slot, Some(meta))?;
        }
        Ok(())
    }

    /// Reads `slot` into `pieces` (one block, in order).
    pub(crate) fn read(&self, slot: u32, block_bytes: usize, pieces: &mut [&mut [u8]]) -> Result<(), KvbmError> {
        let Some((agent, region, offset)) = self.place(slot, block_bytes) else {
            return Ok(());
        };
        check_len(pieces.iter().map(|p| p.len()).sum(), block_bytes)?;
        agent.read_local_pieces(region, offset, pieces)?;
        Ok(())
    }

    /// Forgets what `slot` holds before it is reused (a disk clears its entry first).
    pub(crate) fn clear(&self, slot: u32) -> Result<(), KvbmError> {
        match self {
            Store::Disk(d) => d.write_entry(slot, None),
            _ => Ok(()),
        }
    }
}

fn desc(region: RegionId, offset: u64, len: usize) -> Desc {
    Desc {
        region,
        offset,
        len: len as u64,
    }
}

fn check_len(got: usize, expected: usize) -> Result<(), KvbmError> {
    if got != expected {
        return Err(KvbmError::PieceSizes { got, expected });
    }
    Ok(())
}

/// The disk tier's file, registered as a file region of the agent.
pub(crate) struct DiskFile {
    /// Held open with an exclusive lock for the tier's life: two workers writing one file
    /// would serve each other's blocks under the wrong hashes.
    _lock: std::fs::File,
    agent: Arc<Agent>,
    region: RegionId,
    path: PathBuf,
    slots: usize,
    data_start: u64,
}

impl DiskFile {
    /// Opens the tier's file in `dir`, keeping the blocks it holds when its header matches
    /// (`compat` names the model and layout, with the block size and slot count); a file
    /// written for anything else is started afresh. Returns the valid entries by slot.
    pub(crate) fn open(
        agent: Arc<Agent>,
        dir: &Path,
        compat: u64,
        slots: usize,
        block_bytes: usize,
    ) -> Result<(Self, Vec<(u32, BlockMeta)>), KvbmError> {
        std::fs::create_dir_all(dir).map_err(|source| KvbmError::Io {
            path: dir.to_owned(),
            what: "creating the directory",
            source,
        })?;
        let path = dir.join(format!("turbine-kvbm-{compat:016x}.blocks"));
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| KvbmError::Io {
                path: lock_path.clone(),
                what: "opening the lock",
                source,
            })?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            KvbmError::Config(format!(
                "the disk tier {} is in use by another worker ({e}): give each worker its own --kvbm-disk-dir",
                path.display()
            ))
        })?;
        let table = (slots as u64 * ENTRY).div_ceil(HEADER) * HEADER;
        let data_start = HEADER + table;
        let len = data_start + slots as u64 * block_bytes as u64;
        let existed = path.exists();
        let region = agent.register_file(&path, len)?;
        let file = DiskFile {
            _lock: lock,
            agent,
            region,
            path,
            slots,
            data_start,
        };
        let header = file.header(compat, slots, block_bytes);
        let mut found = vec![0u8; HEADER as usize];
        file.agent.read_local(desc(region, 0, found.len()), &mut found)?;
        if existed && found == header {
            let entries = file.entries()?;
            return Ok((file, entries));
        }
        if existed {
            tracing::warn!(path = %file.path.display(), "disk tier file was written for another model, layout or size: starting it empty");
        }
        // The table first, then the header: a file whose header matches has a valid table.
        let zeros = vec![0u8; table as usize];
        file.agent.write_local(desc(region, HEADER, zeros.len()), &zeros)?;
        file.agent.write_local(desc(region, 0, header.len()), &header)?;
        Ok((file, Vec::new()))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn header(&self, compat: u64, slots: usize, block_bytes: usize) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER as usize);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&compat.to_le_bytes());
        h.extend_from_slice(&(slots as u64).to_le_bytes());
        h.extend_from_slice(&(block_bytes as u64).to_le_bytes());
        h.resize(HEADER as usize, 0);
        h
    }

    fn entries(&self) -> Result<Vec<(u32, BlockMeta)>, KvbmError> {
        let mut table = vec![0u8; self.slots * ENTRY as usize];
        self.agent
            .read_local(desc(self.region, HEADER, table.len()), &mut table)?;
        let word = |e: &[u8], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&e[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Ok(table
            .chunks_exact(ENTRY as usize)
            .enumerate()
            .filter(|(_, e)| word(e, 3) & VALID != 0)
            .map(|(slot, e)| {
                let meta = BlockMeta {
                    hash: BlockHash {
                        sequence: word(e, 0),
                        local: word(e, 1),
                    },
                    parent: (word(e, 3) & HAS_PARENT != 0).then(|| word(e, 2)),
                };
                (slot as u32, meta)
            })
            .collect())
    }

    fn write_entry(&self, slot: u32, meta: Option<&BlockMeta>) -> Result<(), KvbmError> {
        let mut e = [0u8; ENTRY as usize];
        if let Some(m) = meta {
            let flags = VALID | if m.parent.is_some() { HAS_PARENT } else { 0 };
            for (i, w) in [m.hash.sequence, m.hash.local, m.parent.unwrap_or(0), flags]
                .into_iter()
                .enumerate()
            {
                e[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
        }
        let at = HEADER + u64::from(slot) * ENTRY;
        self.agent.write_local(desc(self.region, at, e.len()), &e)?;
        Ok(())
    }
}
