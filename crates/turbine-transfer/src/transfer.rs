//! A posted transfer's shared state and the handle its poster holds: completion, cancel and
//! deadline, with the guarantee that once it reports an outcome no byte is touched again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::error::TransferError;
use crate::metrics::{Backend, Op, Stats};

/// How a transfer is posted: its direction, the caller's tag (a request id: it comes back in
/// the completion and, if `notify`, in the peer's notification), and an optional deadline.
#[derive(Clone, Copy, Debug)]
pub struct Post {
    pub op: Op,
    pub tag: u64,
    pub notify: bool,
    pub deadline: Option<Duration>,
}

impl Post {
    /// READ the peer's bytes into ours, and tell the peer when done.
    pub fn read(tag: u64) -> Self {
        Post {
            op: Op::Read,
            tag,
            notify: true,
            deadline: None,
        }
    }

    /// WRITE our bytes into the peer's, and tell the peer when done.
    pub fn write(tag: u64) -> Self {
        Post {
            op: Op::Write,
            tag,
            notify: true,
            deadline: None,
        }
    }

    pub fn deadline(self, after: Duration) -> Self {
        Post {
            deadline: Some(after),
            ..self
        }
    }

    pub fn without_notification(self) -> Self {
        Post { notify: false, ..self }
    }
}

/// A finished transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub backend: Backend,
}

/// What `Transfer::status` sees without waiting.
#[derive(Clone, Debug)]
pub enum TransferStatus {
    InProgress,
    Done(Completion),
    Failed(TransferError),
}

/// A step of a transfer run by a backend: a group of segments, or the final notification.
type Finisher = Box<dyn FnOnce(Arc<XferState>) + Send>;

pub(crate) struct XferState {
    pub tag: u64,
    pub op: Op,
    pub backend: Backend,
    pub bytes: u64,
    started: Instant,
    deadline: Option<Instant>,
    /// Set by cancel, the deadline or the first failure: steps not yet begun are skipped.
    stop: AtomicBool,
    first_error: Mutex<Option<TransferError>>,
    /// Data steps not yet finished; when the last one finishes `then` runs (the
    /// notification), and its own finish reports the outcome.
    pending: AtomicUsize,
    then: Mutex<Option<Finisher>>,
    outcome: Mutex<Option<Result<Completion, TransferError>>>,
    done: Notify,
    stats: Arc<Stats>,
}

impl XferState {
    pub fn new(
        post: &Post,
        backend: Backend,
        bytes: u64,
        steps: usize,
        then: Option<Finisher>,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        stats.started(backend);
        let started = Instant::now();
        Arc::new(XferState {
            tag: post.tag,
            op: post.op,
            backend,
            bytes,
            started,
            deadline: post.deadline.map(|d| started + d),
            stop: AtomicBool::new(false),
            first_error: Mutex::new(None),
            pending: AtomicUsize::new(steps),
            then: Mutex::new(then),
            outcome: Mutex::new(None),
            done: Notify::new(),
            stats,
        })
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Records why the transfer stops, unless an earlier reason is already recorded.
    pub fn fail(&self, error: TransferError) {
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(error);
        }
        self.stop.store(true, Ordering::Release);
    }

    /// The reason to skip the next step, if any (checking the deadline on the way).
    pub fn should_stop(&self) -> Option<TransferError> {
        if let Some(deadline) = self.deadline {
            if Instant::now() >= deadline {
                self.fail(self.timed_out());
            }
        }
        if self.stop.load(Ordering::Acquire) {
            return Some(self.first_error.lock().clone().unwrap_or(TransferError::Cancelled));
        }
        None
    }

    fn timed_out(&self) -> TransferError {
        TransferError::TimedOut {
            after_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// Called once per data step by whichever backend ran it.
    pub fn step_done(self: &Arc<Self>, result: Result<(), TransferError>) {
        if let Err(e) = result {
            self.fail(e);
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let then = self.then.lock().take();
        match (then, self.should_stop()) {
            (Some(then), None) => then(Arc::clone(self)),
            _ => self.finish(Ok(())),
        }
    }

    /// Reports the outcome: the first recorded failure, else `last`.
    pub fn finish(&self, last: Result<(), TransferError>) {
        if let Err(e) = last {
            self.fail(e);
        }
        let error = self.first_error.lock().clone();
        let elapsed = self.started.elapsed();
        self.stats.finished(
            self.backend,
            self.op,
            self.bytes,
            elapsed.as_nanos() as u64,
            error.as_ref().map(TransferError::kind),
        );
        let outcome = match error {
            Some(e) => Err(e),
            None => Ok(Completion {
                tag: self.tag,
                bytes: self.bytes,
                elapsed,
                backend: self.backend,
            }),
        };
        *self.outcome.lock() = Some(outcome);
        self.done.notify_waiters();
    }
}

/// A posted READ or WRITE. Dropping the handle lets the transfer run on; `cancel` stops it.
pub struct Transfer {
    pub(crate) state: Arc<XferState>,
}

impl Transfer {
    pub fn tag(&self) -> u64 {
        self.state.tag
    }

    pub fn status(&self) -> TransferStatus {
        match self.state.outcome.lock().clone() {
            None => TransferStatus::InProgress,
            Some(Ok(c)) => TransferStatus::Done(c),
            Some(Err(e)) => TransferStatus::Failed(e),
        }
    }

    /// Stops the transfer: steps not begun are skipped, and `wait` then reports `Cancelled`
    /// once the steps in flight have stopped touching memory.
    pub fn cancel(&self) {
        self.state.fail(TransferError::Cancelled);
    }

    /// Waits for the outcome. Past the deadline the transfer is stopped and reported as
    /// timed out, after its steps in flight end (they run under socket timeouts set from
    /// the same deadline).
    pub async fn wait(&self) -> Result<Completion, TransferError> {
        loop {
            let notified = self.state.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(outcome) = self.state.outcome.lock().clone() {
                return outcome;
            }
            match self.state.deadline {
                Some(deadline) if !self.state.stop.load(Ordering::Acquire) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(deadline.into()) => {
                            self.state.fail(self.state.timed_out());
                        }
                    }
                }
                _ => notified.await,
            }
        }
    }
}
