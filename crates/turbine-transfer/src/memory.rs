//! Memory regions an agent registers, and the descriptors that address bytes inside them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::error::TransferError;

/// Where a region's bytes live. `Shared` is a file in a memory file system (`/dev/shm`) that
/// other processes on the host open by path; `File` is an ordinary file (a disk tier);
/// `Device` is GPU memory, which a GPU build registers with its own backend (RDMA or NVLink
/// through NIXL/UCX) and this build refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemKind {
    Host,
    Shared,
    File,
    Device,
}

/// A region's number within its agent; stable for the region's life and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RegionId(pub u32);

/// `len` bytes at `offset` in `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desc {
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
}

/// An ordered list of descriptors; a transfer pairs a local and a remote list byte for byte.
/// Adjacent descriptors in one region merge, so runs of consecutive blocks travel as one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DescList(Vec<Desc>);

impl DescList {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, desc: Desc) {
        if desc.len == 0 {
            return;
        }
        if let Some(last) = self.0.last_mut() {
            if last.region == desc.region && last.offset + last.len == desc.offset {
                last.len += desc.len;
                return;
            }
        }
        self.0.push(desc);
    }

    /// The fixed-size slots `ids` of `region`, in the given order: how callers that lay a
    /// region out as equal blocks turn block ids into descriptors.
    pub fn blocks(region: RegionId, block_bytes: u64, ids: impl IntoIterator<Item = u32>) -> Self {
        let mut list = Self::new();
        for id in ids {
            list.push(Desc {
                region,
                offset: u64::from(id) * block_bytes,
                len: block_bytes,
            });
        }
        list
    }

    pub fn total_len(&self) -> u64 {
        self.0.iter().map(|d| d.len).sum()
    }

    pub fn as_slice(&self) -> &[Desc] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Desc> for DescList {
    fn from_iter<I: IntoIterator<Item = Desc>>(iter: I) -> Self {
        let mut list = Self::new();
        for desc in iter {
            list.push(desc);
        }
        list
    }
}

/// Regions are cut into stripes, each behind its own lock: concurrent transfers into
/// different parts of one region (a transfer's parts on several connections) do not wait
/// for each other, and no copy holds a lock for more than one stripe.
const STRIPE: u64 = 1 << 20;

enum Stripe {
    Heap(Box<[u8]>),
    /// A window of a shared-memory file mapped into this process.
    Map(memmap2::MmapMut),
}

impl std::ops::Deref for Stripe {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Stripe::Heap(b) => b,
            Stripe::Map(m) => m,
        }
    }
}

impl std::ops::DerefMut for Stripe {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Stripe::Heap(b) => b,
            Stripe::Map(m) => m,
        }
    }
}

enum Backing {
    /// Host or shared memory, copied under stripe locks so that this process's readers and
    /// writers of a region never race. Other processes mapping a shared region are kept off
    /// bytes being written by the leases above this crate, not by these locks.
    Memory(Vec<RwLock<Stripe>>),
    /// An ordinary file, read and written with `pread`/`pwrite`.
    File(File),
}

/// `len` bytes of `file` from `offset`, mapped shared.
#[allow(unsafe_code)]
fn map(file: &File, offset: u64, len: usize) -> std::io::Result<memmap2::MmapMut> {
    // SAFETY: the mapping is only touched through `&[u8]`/`&mut [u8]` under the stripe's
    // lock. The file is a region's backing in a memory file system, created by an agent and
    // never truncated while registered; if another process truncated it anyway, access would
    // fault (SIGBUS) rather than read freed memory. Concurrent writers in other processes are
    // excluded from bytes in use by the block leases of the layer above.
    unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map_mut(file) }
}

fn stripe_lens(len: u64) -> impl Iterator<Item = (u64, usize)> {
    (0..len.div_ceil(STRIPE)).map(move |i| (i * STRIPE, (len - i * STRIPE).min(STRIPE) as usize))
}

fn mapped(file: &File, len: u64, path: &Path) -> Result<Backing, TransferError> {
    let stripes = stripe_lens(len)
        .map(|(offset, n)| {
            map(file, offset, n)
                .map(|m| RwLock::new(Stripe::Map(m)))
                .map_err(|e| TransferError::io(format!("mapping {}", path.display()), e))
        })
        .collect::<Result<_, _>>()?;
    Ok(Backing::Memory(stripes))
}

/// Opens `path` for reading and writing (creating it if `create`), with its length.
fn open_sized(path: &Path, create: bool) -> Result<(File, u64), TransferError> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| TransferError::io(format!("opening {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| TransferError::io(format!("reading {}", path.display()), e))?
        .len();
    Ok((file, len))
}

/// Where `offset` falls: stripe index and offset inside it.
fn at(offset: u64) -> (usize, usize) {
    ((offset / STRIPE) as usize, (offset % STRIPE) as usize)
}

/// The longest run from `offset` (at most `left` bytes) that stays in one stripe.
fn run(offset: u64, left: u64) -> u64 {
    left.min(STRIPE - offset % STRIPE)
}

/// The `len` bytes at `offset` cut at stripe boundaries: (bytes before the piece, stripe,
/// offset in the stripe, length).
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let n = run(offset + done, len - done);
        let (i, o) = at(offset + done);
        let piece = (done as usize, i, o, n as usize);
        done += n;
        Some(piece)
    })
}

/// A registered region: its bytes and how to reach them.
pub(crate) struct Region {
    pub id: RegionId,
    pub kind: MemKind,
    pub len: u64,
    pub path: Option<PathBuf>,
    backing: Backing,
    /// Shared regions this agent created are unlinked when it drops them; a peer's, opened
    /// for direct access, are not.
    unlink_on_drop: bool,
    /// A shared region this agent created stays open under a shared `flock` for its life, so
    /// that [`sweep_orphans`] can tell it from one left behind by a process that was killed.
    _owner: Option<File>,
}

/// Names of the shared regions agents create: `{SHARED_PREFIX}{pid}-{agent}-{region}`.
pub(crate) const SHARED_PREFIX: &str = "turbine-xfer-";

/// Removes the shared regions in `dir` whose creator is gone: a process killed before it
/// could unlink them, whose memory would otherwise stay taken until reboot. A live owner
/// holds a lock on its file (in whatever PID namespace it runs), so a file whose lock can
/// be taken exclusively has none. Returns how many it removed.
pub(crate) fn sweep_orphans(dir: &Path) -> usize {
    use rustix::fs::{flock, FlockOperation};
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(SHARED_PREFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = File::options().read(true).open(&path) else {
            continue;
        };
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.unlink_on_drop {
            if let Some(path) = &self.path {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Region {
    pub fn host(id: RegionId, len: u64) -> Result<Self, TransferError> {
        usize::try_from(len).map_err(|_| TransferError::OutOfBounds(format!("host region of {len} bytes")))?;
        let stripes = stripe_lens(len)
            .map(|(_, n)| RwLock::new(Stripe::Heap(vec![0u8; n].into_boxed_slice())))
            .collect();
        Ok(Region {
            id,
            kind: MemKind::Host,
            len,
            path: None,
            backing: Backing::Memory(stripes),
            unlink_on_drop: false,
            _owner: None,
        })
    }

    /// Creates `path` (which must not exist) with `len` zero bytes, mapped into this process.
    /// It is built under a hidden name and renamed once locked, so that a sweep never sees
    /// it unlocked.
    pub fn shared(id: RegionId, path: PathBuf, len: u64) -> Result<Self, TransferError> {
        use rustix::fs::{flock, FlockOperation};
        let building = path.with_file_name(format!(
            ".{}",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&building)
            .map_err(|e| TransferError::io(format!("creating {}", building.display()), e))?;
        let sized = flock(&file, FlockOperation::LockShared)
            .map_err(|e| TransferError::io(format!("locking {}", building.display()), e.into()))
            .and_then(|()| {
                file.set_len(len)
                    .map_err(|e| TransferError::io(format!("sizing {}", building.display()), e))
            })
            .and_then(|()| mapped(&file, len, &building))
            .and_then(|backing| {
                std::fs::rename(&building, &path)
                    .map_err(|e| TransferError::io(format!("naming {}", path.display()), e))?;
                Ok(backing)
            });
        let backing = match sized {
            Ok(backing) => backing,
            Err(e) => {
                let _ = std::fs::remove_file(&building);
                return Err(e);
            }
        };
        Ok(Region {
            id,
            kind: MemKind::Shared,
            len,
            path: Some(path),
            backing,
            unlink_on_drop: true,
            _owner: Some(file),
        })
    }

    /// Opens (creating if absent) `path`, grown to `len` bytes if shorter; its contents stay.
    pub fn file(id: RegionId, path: &Path, len: u64) -> Result<Self, TransferError> {
        let (file, have) = open_sized(path, true)?;
        if have < len {
            file.set_len(len)
                .map_err(|e| TransferError::io(format!("sizing {}", path.display()), e))?;
        }
        Ok(Region {
            id,
            kind: MemKind::File,
            len,
            path: Some(path.to_owned()),
            backing: Backing::File(file),
            unlink_on_drop: false,
            _owner: None,
        })
    }

    /// A peer's shared or file region on this host, opened for direct access: shared
    /// regions are mapped, files read and written in place.
    pub fn open_peer(id: RegionId, kind: MemKind, path: &Path, len: u64) -> Result<Self, TransferError> {
        let (file, have) = open_sized(path, false)?;
        if have < len {
            return Err(TransferError::Mismatch(format!(
                "peer region {} holds {have} bytes, its metadata says {len}",
                path.display()
            )));
        }
        let backing = match kind {
            MemKind::Shared => mapped(&file, len, path)?,
            _ => Backing::File(file),
        };
        Ok(Region {
            id,
            kind,
            len,
            path: Some(path.to_owned()),
            backing,
            unlink_on_drop: false,
            _owner: None,
        })
    }

    pub fn check(&self, offset: u64, len: u64) -> Result<(), TransferError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(TransferError::OutOfBounds(format!(
                "{len} bytes at {offset} in region {} of {} bytes",
                self.id.0, self.len
            ))),
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        self.check(offset, buf.len() as u64)?;
        match &self.backing {
            Backing::Memory(stripes) => {
                for (done, i, o, n) in pieces(offset, buf.len() as u64) {
                    buf[done..done + n].copy_from_slice(&stripes[i].read()[o..o + n]);
                }
                Ok(())
            }
            Backing::File(file) => file
                .read_exact_at(buf, offset)
                .map_err(|e| TransferError::io(self.describe("reading"), e)),
        }
    }

    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), TransferError> {
        self.check(offset, buf.len() as u64)?;
        match &self.backing {
            Backing::Memory(stripes) => {
                for (done, i, o, n) in pieces(offset, buf.len() as u64) {
                    stripes[i].write()[o..o + n].copy_from_slice(&buf[done..done + n]);
                }
                Ok(())
            }
            Backing::File(file) => file
                .write_all_at(buf, offset)
                .map_err(|e| TransferError::io(self.describe("writing"), e)),
        }
    }

    /// Reads the bytes at `offset` into `pieces`, one after another: for a file, one
    /// vectored read (`preadv`) instead of a system call per piece.
    pub fn read_pieces(&self, offset: u64, pieces: &mut [&mut [u8]]) -> Result<(), TransferError> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        self.check(offset, total as u64)?;
        match &self.backing {
            Backing::Memory(_) => {
                let mut at = offset;
                for piece in pieces.iter_mut() {
                    self.read(at, piece)?;
                    at += piece.len() as u64;
                }
                Ok(())
            }
            Backing::File(file) => {
                let mut slices: Vec<std::io::IoSliceMut<'_>> =
                    pieces.iter_mut().map(|p| std::io::IoSliceMut::new(p)).collect();
                let mut bufs = &mut slices[..];
                let mut done = 0usize;
                while done < total {
                    let n = rustix::io::preadv(file, bufs, offset + done as u64)
                        .map_err(|e| TransferError::io(self.describe("reading"), e.into()))?;
                    if n == 0 {
                        return Err(TransferError::io(
                            self.describe("reading"),
                            std::io::ErrorKind::UnexpectedEof.into(),
                        ));
                    }
                    done += n;
                    std::io::IoSliceMut::advance_slices(&mut bufs, n);
                }
                Ok(())
            }
        }
    }

    /// Writes `pieces` one after another from `offset`: for a file, one vectored write.
    pub fn write_pieces(&self, offset: u64, pieces: &[&[u8]]) -> Result<(), TransferError> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        self.check(offset, total as u64)?;
        match &self.backing {
            Backing::Memory(_) => {
                let mut at = offset;
                for piece in pieces {
                    self.write(at, piece)?;
                    at += piece.len() as u64;
                }
                Ok(())
            }
            Backing::File(file) => {
                let mut slices: Vec<std::io::IoSlice<'_>> = pieces.iter().map(|p| std::io::IoSlice::new(p)).collect();
                let mut bufs = &mut slices[..];
                let mut done = 0usize;
                while done < total {
                    let n = rustix::io::pwritev(file, bufs, offset + done as u64)
                        .map_err(|e| TransferError::io(self.describe("writing"), e.into()))?;
                    if n == 0 {
                        return Err(TransferError::io(
                            self.describe("writing"),
                            std::io::ErrorKind::WriteZero.into(),
                        ));
                    }
                    done += n;
                    std::io::IoSlice::advance_slices(&mut bufs, n);
                }
                Ok(())
            }
        }
    }

    /// Calls `f` on the `len` bytes at `offset`, piece by piece (a stripe at most): the
    /// region's own memory, or for files a copy in `scratch`. How sockets send without an
    /// extra copy. `f`'s error stops the walk and is returned as the inner error.
    pub fn each_piece<E>(
        &self,
        offset: u64,
        len: u64,
        scratch: &mut Vec<u8>,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, TransferError> {
        self.check(offset, len)?;
        for (done, i, o, n) in pieces(offset, len) {
            let result = match &self.backing {
                Backing::Memory(stripes) => f(&stripes[i].read()[o..o + n]),
                Backing::File(_) => {
                    scratch.resize(n, 0);
                    self.read(offset + done as u64, scratch)?;
                    f(scratch)
                }
            };
            if result.is_err() {
                return Ok(result);
            }
        }
        Ok(Ok(()))
    }

    /// Calls `f` to fill the `len` bytes at `offset` piece by piece, in place for memory.
    /// After an error from `f` the bytes it did not fill are unspecified.
    pub fn fill_pieces<E>(
        &self,
        offset: u64,
        len: u64,
        scratch: &mut Vec<u8>,
        mut f: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, TransferError> {
        self.check(offset, len)?;
        for (done, i, o, n) in pieces(offset, len) {
            let result = match &self.backing {
                Backing::Memory(stripes) => f(&mut stripes[i].write()[o..o + n]),
                Backing::File(_) => {
                    scratch.resize(n, 0);
                    let result = f(scratch);
                    if result.is_ok() {
                        self.write(offset + done as u64, scratch)?;
                    }
                    result
                }
            };
            if result.is_err() {
                return Ok(result);
            }
        }
        Ok(Ok(()))
    }

    fn describe(&self, what: &str) -> String {
        match &self.path {
            Some(path) => format!("{what} {}", path.display()),
            None => format!("{what} region {}", self.id.0),
        }
    }
}

/// Copies `len` bytes between two regions (possibly the same one). Stripe locks are taken
/// in address order, so two copies in opposite directions cannot deadlock.
pub(crate) fn copy(
    src: &Region,
    src_off: u64,
    dst: &Region,
    dst_off: u64,
    len: u64,
    scratch: &mut Vec<u8>,
) -> Result<(), TransferError> {
    src.check(src_off, len)?;
    dst.check(dst_off, len)?;
    match (&src.backing, &dst.backing) {
        (Backing::Memory(from), Backing::Memory(to)) => {
            let mut done = 0;
            while done < len {
                let n = run(src_off + done, len - done).min(run(dst_off + done, len - done)) as usize;
                let ((si, so), (di, d)) = (at(src_off + done), at(dst_off + done));
                let (a, b) = (&from[si], &to[di]);
                if std::ptr::eq(a, b) {
                    a.write().copy_within(so..so + n, d);
                } else if (a as *const RwLock<Stripe>) < (b as *const RwLock<Stripe>) {
                    let s = a.read();
                    b.write()[d..d + n].copy_from_slice(&s[so..so + n]);
                } else {
                    let mut t = b.write();
                    t[d..d + n].copy_from_slice(&a.read()[so..so + n]);
                }
                done += n as u64;
            }
            Ok(())
        }
        (Backing::Memory(_), Backing::File(_)) => {
            let mut at_dst = dst_off;
            src.each_piece(src_off, len, scratch, |piece| {
                let written = dst.write(at_dst, piece);
                at_dst += piece.len() as u64;
                written
            })?
        }
        (Backing::File(_), Backing::Memory(_)) => {
            let mut at_src = src_off;
            dst.fill_pieces(dst_off, len, scratch, |piece| {
                let read = src.read(at_src, piece);
                at_src += piece.len() as u64;
                read
            })?
        }
        (Backing::File(_), Backing::File(_)) => {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(STRIPE);
                scratch.resize(n as usize, 0);
                src.read(src_off + done, scratch)?;
                dst.write(dst_off + done, scratch)?;
                done += n;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pieces_are_read_and_written_in_order_across_stripes_and_files() -> Result<(), TransferError> {
        let dir = tempfile::tempdir().map_err(|e| TransferError::io("tempdir", e))?;
        // Pieces that cross a stripe boundary, of uneven sizes.
        let sizes = [3usize, STRIPE as usize, 17, 1];
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let len = 4 * STRIPE;
        for region in [
            Region::host(RegionId(0), len)?,
            Region::file(RegionId(1), &dir.path().join("f"), len)?,
        ] {
            let at = STRIPE - 5;
            let pieces: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
            region.write_pieces(at, &pieces)?;
            let mut back: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0; n]).collect();
            let mut slices: Vec<&mut [u8]> = back.iter_mut().map(|b| b.as_mut_slice()).collect();
            region.read_pieces(at, &mut slices)?;
            assert_eq!(back, data);
            let mut flat = vec![0; sizes.iter().sum()];
            region.read(at, &mut flat)?;
            assert_eq!(flat, data.concat());
            let mut past = [vec![0u8; 8]];
            let mut past: Vec<&mut [u8]> = past.iter_mut().map(|b| b.as_mut_slice()).collect();
            assert!(region.read_pieces(len - 4, &mut past).is_err(), "out of bounds");
        }
        Ok(())
    }

    #[test]
    fn adjacent_blocks_merge_into_one_descriptor() {
        let list = DescList::blocks(RegionId(1), 4096, [3, 4, 5, 9, 2]);
        let offsets: Vec<(u64, u64)> = list.as_slice().iter().map(|d| (d.offset, d.len)).collect();
        assert_eq!(offsets, vec![(3 * 4096, 3 * 4096), (9 * 4096, 4096), (2 * 4096, 4096)]);
        assert_eq!(list.total_len(), 5 * 4096);
    }

    #[test]
    fn copies_between_every_kind_of_backing() -> Result<(), TransferError> {
        let dir = tempfile::tempdir().map_err(|e| TransferError::io("tempdir", e))?;
        let host_a = Arc::new(Region::host(RegionId(0), 64)?);
        let host_b = Arc::new(Region::host(RegionId(1), 64)?);
        let shm = Arc::new(Region::shared(RegionId(2), dir.path().join("shm"), 64)?);
        let file = Arc::new(Region::file(RegionId(3), &dir.path().join("f"), 64)?);
        host_a.write(0, b"0123456789abcdef")?;
        // A region larger than a stripe, written and copied across stripe boundaries.
        let big = Arc::new(Region::host(RegionId(4), 3 * STRIPE)?);
        let bytes: Vec<u8> = (0..2 * STRIPE + 10).map(|i| (i % 251) as u8).collect();
        big.write(7, &bytes)?;
        let shm_big = Arc::new(Region::shared(RegionId(5), dir.path().join("big"), 4 * STRIPE)?);
        copy(&big, 7, &shm_big, STRIPE - 3, bytes.len() as u64, &mut Vec::new())?;
        copy(
            &shm_big,
            STRIPE - 3,
            &big,
            STRIPE + 1,
            bytes.len() as u64 - STRIPE,
            &mut Vec::new(),
        )?;
        let mut back = vec![0u8; bytes.len() - STRIPE as usize];
        big.read(STRIPE + 1, &mut back)?;
        assert_eq!(back, bytes[..back.len()]);
        let mut scratch = Vec::new();
        copy(&host_a, 0, &host_b, 8, 16, &mut scratch)?;
        copy(&host_b, 8, &shm, 0, 16, &mut scratch)?;
        copy(&shm, 0, &file, 32, 16, &mut scratch)?;
        copy(&file, 32, &host_a, 40, 16, &mut scratch)?;
        copy(&host_a, 40, &host_a, 20, 16, &mut scratch)?;
        let mut out = [0u8; 16];
        host_a.read(20, &mut out)?;
        assert_eq!(&out, b"0123456789abcdef");
        assert!(matches!(
            copy(&host_a, 60, &host_b, 0, 8, &mut scratch),
            Err(TransferError::OutOfBounds(_))
        ));
        Ok(())
    }

    #[test]
    fn a_sweep_removes_regions_whose_owner_is_gone_and_keeps_live_ones() -> Result<(), TransferError> {
        let dir = tempfile::tempdir().map_err(|e| TransferError::io("tempdir", e))?;
        let live = dir.path().join(format!("{SHARED_PREFIX}1-live"));
        let region = Region::shared(RegionId(0), live.clone(), 4096)?;
        // What a killed owner leaves: the file, with no lock on it.
        let orphan = dir.path().join(format!("{SHARED_PREFIX}2-orphan"));
        std::fs::write(&orphan, [0u8; 16]).map_err(|e| TransferError::io("orphan", e))?;
        let unrelated = dir.path().join("someone-else");
        std::fs::write(&unrelated, b"x").map_err(|e| TransferError::io("unrelated", e))?;
        assert_eq!(sweep_orphans(dir.path()), 1);
        assert!(live.exists() && unrelated.exists() && !orphan.exists());
        // A second sweep finds nothing, and the live region still works.
        assert_eq!(sweep_orphans(dir.path()), 0);
        region.write(0, b"ok")?;
        drop(region);
        assert!(!live.exists());
        Ok(())
    }

    #[test]
    fn a_shared_region_is_unlinked_when_dropped_and_a_file_region_keeps_its_bytes() -> Result<(), TransferError> {
        let dir = tempfile::tempdir().map_err(|e| TransferError::io("tempdir", e))?;
        let path = dir.path().join("shm");
        drop(Region::shared(RegionId(0), path.clone(), 8)?);
        assert!(!path.exists());
        let file_path = dir.path().join("disk");
        Region::file(RegionId(0), &file_path, 8)?.write(0, b"kept")?;
        let mut out = [0u8; 4];
        Region::file(RegionId(0), &file_path, 8)?.read(0, &mut out)?;
        assert_eq!(&out, b"kept");
        Ok(())
    }
}
