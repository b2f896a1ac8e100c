//! The copier: a thread that reads tier blocks into staging buffers, so that slow reads (a
//! disk's) run beside the engine's steps instead of between them. The engine's thread
//! scatters a finished buffer into its pool; on a GPU the buffer would be pinned host
//! memory and the scatter a copy-stream transfer fenced before the step that reads it.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use turbine_transfer::TransferError;

use crate::store::Source;

/// Blocks read into one buffer before it is handed back: small enough that the engine's
/// thread scatters one chunk while the next is read, and that the chunk is still in the
/// CPU's caches when it does (one of SmolLM2's 720 KiB blocks). Chunks of 6 MiB ran at
/// 0.6-1.0x a plain `pread` here, the scatter missing the caches; 1 MiB at 0.9-1.1x.
const CHUNK_BYTES: usize = 1 << 20;

/// Staging buffers kept for reuse: enough for the copier to read ahead of the engine by a
/// few chunks, without holding a long load's worth of memory afterwards.
const SPARE_BUFFERS: usize = 8;

/// What to read: blocks of `block_bytes`, in order, handed back chunk by chunk.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) reads: Vec<Source>,
    pub(crate) block_bytes: usize,
}

/// One chunk of a job: its blocks from `first` on, of which the first `ok` were read into
/// `data`; `error` says why the next one was not. The last chunk (or the one that failed)
/// has `last`.
pub(crate) struct Done {
    pub(crate) id: u64,
    pub(crate) first: usize,
    pub(crate) data: Vec<u8>,
    pub(crate) ok: usize,
    pub(crate) error: Option<TransferError>,
    pub(crate) last: bool,
    pub(crate) elapsed: Duration,
}

/// Blocks per chunk of `block_bytes`.
pub(crate) fn chunk_blocks(block_bytes: usize) -> usize {
    (CHUNK_BYTES / block_bytes.max(1)).max(1)
}

/// Called from the copier's thread after each job it finishes, so that an engine loop
/// asleep for want of work wakes to collect it.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

pub(crate) struct Copier {
    waker: Arc<parking_lot::Mutex<Option<Waker>>>,
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    /// Buffers scattered, back to the thread: reads land in memory already mapped, not in
    /// fresh pages the kernel must fault in and zero.
    recycle: mpsc::Sender<Vec<u8>>,
    thread: Option<JoinHandle<()>>,
}

impl Copier {
    pub(crate) fn start() -> std::io::Result<Self> {
        let waker: Arc<parking_lot::Mutex<Option<Waker>>> = Arc::default();
        let wake = waker.clone();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
        let thread = std::thread::Builder::new().name("kvbm-copier".into()).spawn(move || {
            let mut spare = Vec::new();
            for job in job_rx {
                let mut buffer = || {
                    while let Ok(b) = recycled.try_recv() {
                        if spare.len() < SPARE_BUFFERS {
                            spare.push(b);
                        }
                    }
                    spare.pop().unwrap_or_default()
                };
                let sent = run(job, &mut buffer, |done| {
                    let sent = done_tx.send(done).is_ok();
                    let w = wake.lock().clone();
                    if let Some(w) = w {
                        w();
                    }
                    sent
                });
                if !sent {
                    return;
                }
            }
        })?;
        Ok(Self {
            waker,
            jobs: Some(jobs),
            done,
            recycle,
            thread: Some(thread),
        })
    }

    pub(crate) fn set_waker(&self, waker: Waker) {
        *self.waker.lock() = Some(waker);
    }

    /// Queues `job`; false if the thread has gone (it only ends when dropped).
    pub(crate) fn submit(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Whether the thread has ended (it only does by panicking while the copier lives).
    pub(crate) fn is_gone(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Gives a chunk's buffer back once its bytes are out.
    pub(crate) fn recycle(&self, buffer: Vec<u8>) {
        let _ = self.recycle.send(buffer);
    }

    pub(crate) fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// Waits for the next finished chunk: `Ok(None)` on a timeout, `Err` if the thread has
    /// gone and none can come.
    pub(crate) fn wait_done(&self, timeout: Duration) -> Result<Option<Done>, Gone> {
        match self.done.recv_timeout(timeout) {
            Ok(d) => Ok(Some(d)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Gone),
        }
    }
}

/// The copier's thread has ended (it panicked): its jobs will not finish.
#[derive(Debug)]
pub(crate) struct Gone;

impl Drop for Copier {
    fn drop(&mut self) {
        // Closing the queue ends the thread once its jobs are read: none is abandoned
        // half-way through a buffer.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads `job` chunk by chunk, handing each to `send`; false once `send` is refused.
fn run(job: Job, buffer: &mut dyn FnMut() -> Vec<u8>, mut send: impl FnMut(Done) -> bool) -> bool {
    let bb = job.block_bytes;
    let per = chunk_blocks(bb);
    let n = job.reads.len();
    let mut first = 0;
    while first < n {
        let started = Instant::now();
        let end = (first + per).min(n);
        let mut data = buffer();
        // Grown, never shrunk: a buffer keeps the pages it has.
        if data.len() < (end - first) * bb {
            data.resize((end - first) * bb, 0);
        }
        let mut ok = 0;
        let mut error = None;
        for (i, src) in job.reads[first..end].iter().enumerate() {
            let piece = &mut data[i * bb..(i + 1) * bb];
            match src.agent.read_local_pieces(src.region, src.offset, &mut [piece]) {
                Ok(()) => ok += 1,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let last = end == n || error.is_some();
        let done = Done {
            id: job.id,
            first,
            data,
            ok,
            error,
            last,
            elapsed: started.elapsed(),
        };
        if !send(done) {
            return false;
        }
        if last {
            break;
        }
        first = end;
    }
    true
}
