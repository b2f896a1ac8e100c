//! Where a sequence's tokens wait for its reader: one slot per sequence, not a queue.
//!
//! The engine counts each step's token in the slot; the reader takes every token counted
//! since its last output in one output. A reader that keeps up gets one token per output,
//! one that falls behind gets several, and nothing grows without bound. How the reader
//! learns the values is the slot's [`TokenValues`]: the native engine hands them over
//! ([`Buffered`]); the mocker's are a function of seed and position ([`TokenSource`]), so
//! the reader computes them and the slot holds nothing but the count.
//!
//! At a million tokens a second the cost is memory traffic and atomic operations, not
//! instructions: per token the engine touches one small shared allocation with one atomic
//! add to its state word, and wakes the reader only if it is waiting. The reader's waker
//! is kept, not handed over per wake-up: a stream is polled by one task, so the engine
//! reads it without a lock. Its wait stays set once made, so a reader that keeps up finds
//! its next token, or goes back to waiting, with plain loads: a token that arrives while
//! it is not waiting costs at most one wake-up for nothing, which its task absorbs.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use turbine_protocols::{EngineOutput, FinishReason, OutputTokens};

use super::scheduler::TokenSource;
use crate::EngineError;

/// How a slot's reader learns the values of the tokens the engine counted. The value of
/// this type is the reader's; `Shared` is what both ends hold.
pub trait TokenValues: Send + Unpin + 'static {
    type Shared: Default + Send + Sync + 'static;
    /// Keeps `token`, about to be counted, where the reader will find it.
    fn store(shared: &Self::Shared, token: u32);
    /// The sequence's tokens `from..to` (counting from its first generated token): those
    /// counted since the reader last took.
    fn take(&self, shared: &Self::Shared, from: u32, to: u32) -> OutputTokens;
}

/// Token values handed over in the slot, for an engine that computes them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Buffered;

impl TokenValues for Buffered {
    /// Tokens stored and not yet taken; kept allocated, so the engine's side rarely
    /// allocates.
    type Shared = Mutex<Vec<u32>>;

    fn store(shared: &Self::Shared, token: u32) {
        lock(shared).push(token);
    }

    fn take(&self, shared: &Self::Shared, from: u32, to: u32) -> OutputTokens {
        let mut tokens = lock(shared);
        // Tokens stored after the count was read stay for the next output.
        let n = ((to - from) as usize).min(tokens.len());
        tokens.drain(..n).collect()
    }
}

/// Token values computed by the reader: nothing is stored.
impl TokenValues for TokenSource {
    type Shared = ();

    fn store((): &(), _: u32) {}

    fn take(&self, (): &(), from: u32, to: u32) -> OutputTokens {
        let mut tokens = OutputTokens::new();
        for i in from..to {
            tokens.push(self.token(i));
        }
        tokens
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// The slot's state word: tokens counted so far, how the sequence finished (set with its
// last token, in the same update, so that a reader that sees it has seen every token),
// whether either side has gone, and whether the reader waits to be woken, through which
// of its wakers. `WAITING` (the first waker) stays set until the reader moves to another
// task; `WAITING_OTHER` is cleared by the wake-up it asked for.
const COUNT_MASK: u64 = 0xFFFF_FFFF;
const FINISH_SHIFT: u32 = 32;
const FINISH_MASK: u64 = 0xFF << FINISH_SHIFT;
const READER_GONE: u64 = 1 << 40;
const WRITER_GONE: u64 = 1 << 41;
const WAITING: u64 = 1 << 42;
const WAITING_OTHER: u64 = 1 << 43;
const NO_CACHED: u32 = u32::MAX;

fn finish_code(finish: Option<FinishReason>) -> u64 {
    let code = match finish {
        None => 0,
        Some(FinishReason::Stop) => 1,
        Some(FinishReason::Length) => 2,
        Some(FinishReason::Cancelled) => 3,
    };
    code << FINISH_SHIFT
}

fn finish_of(state: u64) -> Option<FinishReason> {
    match (state & FINISH_MASK) >> FINISH_SHIFT {
        1 => Some(FinishReason::Stop),
        2 => Some(FinishReason::Length),
        3 => Some(FinishReason::Cancelled),
        _ => None,
    }
}

// In this order so that `OutputWriter::warm` reaches both ends of what the engine touches
// per token, which may straddle two cache lines; the rest after.
#[derive(Debug)]
#[repr(C)]
struct Slot<S> {
    state: AtomicU64,
    /// The waker of the first task to wait on the stream; set once, so read without a lock.
    waker: OnceLock<Waker>,
    /// Prompt tokens served from cache; written before the first token is counted.
    cached_tokens: AtomicU32,
    /// The waker of any later task, should the stream move between tasks.
    other_waker: Mutex<Option<Waker>>,
    shared: S,
}

impl<S> Slot<S> {
    /// Wakes the reader if `state` says it waits.
    fn wake(&self, state: u64) {
        if state & WAITING != 0 {
            if let Some(w) = self.waker.get() {
                w.wake_by_ref();
            }
        }
        if state & WAITING_OTHER != 0 {
            if let Some(w) = lock(&self.other_waker).take() {
                w.wake();
            }
        }
    }

    /// Keeps `waker` for the writer; returns the state bit that says which waker to use.
    fn keep(&self, waker: &Waker) -> u64 {
        if self.waker.get_or_init(|| waker.clone()).will_wake(waker) {
            return WAITING;
        }
        let mut other = lock(&self.other_waker);
        if !other.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *other = Some(waker.clone());
        }
        // The first waker's task no longer reads: stop waking it.
        self.state.fetch_and(!WAITING, Ordering::Relaxed);
        WAITING_OTHER
    }
}

/// The engine's end.
#[derive(Debug)]
pub struct OutputWriter<K: TokenValues>(Arc<Slot<K::Shared>>);

/// The reader's end: a stream of [`EngineOutput`]s.
#[derive(Debug)]
pub struct OutputReader<K: TokenValues> {
    slot: Arc<Slot<K::Shared>>,
    values: K,
    /// Tokens handed out so far.
    delivered: u32,
    done: bool,
}

/// A slot whose reader learns token values through `values`.
pub fn output_slot<K: TokenValues>(values: K) -> (OutputWriter<K>, OutputReader<K>) {
    let slot = Arc::new(Slot {
        state: AtomicU64::new(0),
        waker: OnceLock::new(),
        cached_tokens: AtomicU32::new(NO_CACHED),
        other_waker: Mutex::new(None),
        shared: K::Shared::default(),
    });
    let reader = OutputReader {
        slot: slot.clone(),
        values,
        delivered: 0,
        done: false,
    };
    (OutputWriter(slot), reader)
}

impl<K: TokenValues> OutputWriter<K> {
    /// Adds a token; false once the reader is gone.
    pub fn push(&self, token: u32, cached_tokens: Option<u32>, finish: Option<FinishReason>) -> bool {
        if let Some(c) = cached_tokens {
            self.0.cached_tokens.store(c.min(NO_CACHED - 1), Ordering::Relaxed);
        }
        K::store(&self.0.shared, token);
        // The count and the finish are the writer's alone: one add, which cannot carry out
        // of the count (a sequence never reaches 2^32 tokens).
        let old = self.0.state.fetch_add(1 | finish_code(finish), Ordering::AcqRel);
        if old & READER_GONE != 0 {
            return false;
        }
        if old & WAITING_OTHER != 0 {
            // Taken with the waker it names; the reader sets it again if it waits again.
            self.0.state.fetch_and(!WAITING_OTHER, Ordering::AcqRel);
        }
        self.0.wake(old);
        true
    }

    /// Brings the slot into cache ahead of [`Self::push`]; see `Scheduler::touch_sinks`.
    pub fn warm(&self) {
        std::hint::black_box(self.0.state.load(Ordering::Relaxed));
        std::hint::black_box(self.0.cached_tokens.load(Ordering::Relaxed));
    }
}

impl<K: TokenValues> Drop for OutputWriter<K> {
    fn drop(&mut self) {
        let old = self.0.state.fetch_or(WRITER_GONE, Ordering::AcqRel);
        self.0.wake(old);
    }
}

impl<K: TokenValues> OutputReader<K> {
    /// What `state` has for the reader: tokens, or the end; `None` if nothing yet.
    fn ready(&mut self, state: u64) -> Option<Option<Result<EngineOutput, EngineError>>> {
        if (state & COUNT_MASK) as u32 > self.delivered {
            return Some(Some(Ok(self.take(state))));
        }
        if state & WRITER_GONE != 0 {
            self.done = true;
            return Some(None);
        }
        None
    }

    fn take(&mut self, state: u64) -> EngineOutput {
        let counted = (state & COUNT_MASK) as u32;
        let cached_tokens = if self.delivered == 0 {
            let c = self.slot.cached_tokens.load(Ordering::Relaxed);
            (c != NO_CACHED).then_some(c)
        } else {
            None
        };
        let token_ids = self.values.take(&self.slot.shared, self.delivered, counted);
        self.delivered = counted;
        let finish_reason = finish_of(state);
        self.done = finish_reason.is_some();
        EngineOutput {
            token_ids,
            finish_reason,
            cached_tokens,
            kv_transfer: None,
        }
    }
}

impl<K: TokenValues> Stream for OutputReader<K> {
    type Item = Result<EngineOutput, EngineError>;

    // Inlined into the request plane's poll, which otherwise moves each output through
    // one more call.
    #[inline]
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let state = self.slot.state.load(Ordering::Acquire);
        if let Some(ready) = self.ready(state) {
            return Poll::Ready(ready);
        }
        // Wait, then look again, so that a token counted in between is not missed (if one
        // was, the wait stays set, and the next token wakes the task once for nothing).
        let wait = self.slot.keep(cx.waker());
        if wait == WAITING && state & WAITING != 0 {
            // Already waiting, through this waker, as the state just read says: only the
            // reader clears that, so any token counted after that load wakes this task.
            return Poll::Pending;
        }
        let state = self.slot.state.fetch_or(wait, Ordering::AcqRel);
        match self.ready(state) {
            Some(ready) => Poll::Ready(ready),
            None => Poll::Pending,
        }
    }
}

impl<K: TokenValues> Drop for OutputReader<K> {
    fn drop(&mut self) {
        self.slot.state.fetch_or(READER_GONE, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn source() -> TokenSource {
        TokenSource::new(7, &(0..32000))
    }

    /// Tokens 0, 1 and 2 pushed as `token(i)`; a buffered slot must give back what was
    /// pushed, a computed one what its source says, which here is the same.
    async fn slow_reader_gets_tokens_together_and_the_end<K: TokenValues>(values: K, token: impl Fn(u32) -> u32) {
        let (w, mut r) = output_slot(values);
        assert!(w.push(token(0), Some(0), None));
        assert!(w.push(token(1), None, None));
        let first = r.next().await.unwrap().unwrap();
        assert_eq!(
            (first.token_ids.to_vec(), first.cached_tokens, first.finish_reason),
            (vec![token(0), token(1)], Some(0), None)
        );
        assert!(w.push(token(2), None, Some(FinishReason::Length)));
        let last = r.next().await.unwrap().unwrap();
        assert_eq!(
            (last.token_ids.to_vec(), last.cached_tokens, last.finish_reason),
            (vec![token(2)], None, Some(FinishReason::Length))
        );
        assert!(r.next().await.is_none());
    }

    #[tokio::test]
    async fn a_slow_reader_gets_tokens_together_and_the_end() {
        let s = source();
        slow_reader_gets_tokens_together_and_the_end(s, |i| s.token(i)).await;
        slow_reader_gets_tokens_together_and_the_end(Buffered, |i| 100 + i).await;
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_the_next_token() {
        let (w, mut r) = output_slot(Buffered);
        let reader = tokio::spawn(async move { r.next().await.unwrap().unwrap().token_ids.to_vec() });
        tokio::task::yield_now().await;
        assert!(w.push(9, None, None));
        assert_eq!(reader.await.unwrap(), vec![9]);
    }

    #[tokio::test]
    async fn a_reader_moved_to_another_task_is_woken_there() {
        let (w, mut r) = output_slot(Buffered);
        let waker = futures::task::noop_waker();
        assert!(r.poll_next_unpin(&mut Context::from_waker(&waker)).is_pending());
        let reader = tokio::spawn(async move {
            let first = r.next().await.unwrap().unwrap().token_ids.to_vec();
            (first, r.next().await.unwrap().unwrap().token_ids.to_vec())
        });
        tokio::task::yield_now().await;
        assert!(w.push(1, None, None));
        tokio::task::yield_now().await;
        assert!(w.push(2, None, None));
        assert_eq!(reader.await.unwrap(), (vec![1], vec![2]));
    }

    /// A writer on another thread racing a reader that waits between tokens: no token and
    /// no wake-up is lost (a lost one hangs the reader, and the timeout fails the test).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_racing_a_writer_on_another_thread_gets_everything() {
        const N: u32 = 200_000;
        let (w, mut r) = output_slot(Buffered);
        let writer = std::thread::spawn(move || {
            for i in 0..N {
                let finish = (i + 1 == N).then_some(FinishReason::Length);
                assert!(w.push(i, None, finish));
                if i % 1024 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let read = async {
            let mut next = 0;
            while let Some(out) = r.next().await {
                for t in out.unwrap().token_ids {
                    assert_eq!(t, next);
                    next += 1;
                }
            }
            next
        };
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), read).await;
        writer.join().unwrap();
        assert_eq!(got.expect("no wake-up lost"), N);
    }

    #[tokio::test]
    async fn either_side_going_away_is_seen() {
        let (w, mut r) = output_slot(source());
        drop(w);
        assert!(r.next().await.is_none(), "writer gone: the stream ends");
        let (w, r) = output_slot(Buffered);
        drop(r);
        assert!(!w.push(1, None, None), "reader gone: the writer is told");
    }
}
