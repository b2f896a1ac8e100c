//! Where a sequence's tokens wait for its reader: one slot per sequence, not a queue.
//!
//! The engine counts each step's token in the slot; the reader takes every token counted
//! since its last output in one output. A reader that keeps up gets one token per output,
//! one that falls behind gets several, and nothing grows without bound. How the reader
//! learns the values is the slot's [`TokenValues`]: the native engine hands them over
//! ([`Buffered`]); the mocker's are a function of seed and position ([`TokenSource`]), so
//! the reader computes them and the slot holds nothing but the count.
//!
//! At a million tokens a second the cost is memory traffic, not instructions: per token
//! the engine touches one small shared allocation (a counter and a waker), and the reader
//! is woken only if it registered its waker since the last wake-up.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use futures::Stream;
use turbine_protocols::{EngineOutput, FinishReason};

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
    fn take(&self, shared: &Self::Shared, from: u32, to: u32) -> Vec<u32>;
}

/// Token values handed over in the slot, for an engine that computes them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Buffered;

impl TokenValues for Buffered {
    /// Tokens stored and not yet taken; kept allocated, so the engine's side rarely
    /// allocates.
    type Shared = Mutex<Vec<u32>>;

    fn store(shared: &Self::Shared, token: u32) {
        shared.lock().unwrap_or_else(|e| e.into_inner()).push(token);
    }

    fn take(&self, shared: &Self::Shared, from: u32, to: u32) -> Vec<u32> {
        let mut tokens = shared.lock().unwrap_or_else(|e| e.into_inner());
        // Tokens stored after the count was read stay for the next output.
        let n = ((to - from) as usize).min(tokens.len());
        tokens.drain(..n).collect()
    }
}

/// Token values computed by the reader: nothing is stored.
impl TokenValues for TokenSource {
    type Shared = ();

    fn store((): &(), _: u32) {}

    fn take(&self, (): &(), from: u32, to: u32) -> Vec<u32> {
        (from..to).map(|i| self.token(i)).collect()
    }
}

// The slot's state word: tokens counted so far, how the sequence finished (set with its
// last token, in the same update, so that a reader that sees it has seen every token),
// and whether either side has gone.
const COUNT_MASK: u64 = 0xFFFF_FFFF;
const FINISH_SHIFT: u32 = 32;
const FINISH_MASK: u64 = 0xFF << FINISH_SHIFT;
const READER_GONE: u64 = 1 << 40;
const WRITER_GONE: u64 = 1 << 41;
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

// In this order so that `OutputWriter::warm` reaches both ends of what the engine touches,
// which may straddle two cache lines; `shared` last, as the mocker's is empty.
#[derive(Debug)]
#[repr(C)]
struct Slot<S> {
    state: AtomicU64,
    waker: AtomicWaker,
    /// Prompt tokens served from cache; written before the first token is counted.
    cached_tokens: AtomicU32,
    shared: S,
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
        waker: AtomicWaker::new(),
        cached_tokens: AtomicU32::new(NO_CACHED),
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
        let old = self.0.state.fetch_add(1 | finish_code(finish), Ordering::Release);
        if old & READER_GONE != 0 {
            return false;
        }
        // Takes the waker only if the reader registered one since the last wake-up, so a
        // reader that lags is woken once for all the tokens it will find.
        self.0.waker.wake();
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
        self.0.state.fetch_or(WRITER_GONE, Ordering::Release);
        self.0.waker.wake();
    }
}

impl<K: TokenValues> OutputReader<K> {
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
        }
    }
}

impl<K: TokenValues> Stream for OutputReader<K> {
    type Item = Result<EngineOutput, EngineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut registered = false;
        loop {
            let state = self.slot.state.load(Ordering::Acquire);
            if (state & COUNT_MASK) as u32 > self.delivered {
                return Poll::Ready(Some(Ok(self.take(state))));
            }
            if state & WRITER_GONE != 0 {
                self.done = true;
                return Poll::Ready(None);
            }
            if registered {
                return Poll::Pending;
            }
            // Register, then look again: a token counted in between is not missed.
            self.slot.waker.register(cx.waker());
            registered = true;
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
            (first.token_ids, first.cached_tokens, first.finish_reason),
            (vec![token(0), token(1)], Some(0), None)
        );
        assert!(w.push(token(2), None, Some(FinishReason::Length)));
        let last = r.next().await.unwrap().unwrap();
        assert_eq!(
            (last.token_ids, last.cached_tokens, last.finish_reason),
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
        let reader = tokio::spawn(async move { r.next().await.unwrap().unwrap().token_ids });
        tokio::task::yield_now().await;
        assert!(w.push(9, None, None));
        assert_eq!(reader.await.unwrap(), vec![9]);
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
