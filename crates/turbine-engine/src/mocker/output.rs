//! Where a sequence's tokens wait for its reader: one slot per sequence, not a queue.
//!
//! The engine appends each step's token; the reader takes everything there in one output.
//! A reader that keeps up gets one token per output, one that falls behind gets several,
//! and nothing grows without bound. Cheaper than a channel at a million tokens a second:
//! one uncontended lock, and a wake-up only when the reader is waiting.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use turbine_protocols::{EngineOutput, FinishReason};

use crate::EngineError;

#[derive(Debug, Default)]
struct Slot {
    /// Kept allocated: the reader copies tokens out, so the engine's side never allocates.
    tokens: Vec<u32>,
    cached_tokens: Option<u32>,
    finish: Option<FinishReason>,
    /// The reader's waker, kept across wake-ups so that neither side clones it per token.
    waker: Option<Waker>,
    /// The reader returned `Pending` and has not been woken since.
    reader_waiting: bool,
    writer_gone: bool,
    reader_gone: bool,
}

/// The engine's end.
#[derive(Debug)]
pub struct OutputWriter(Arc<Mutex<Slot>>);

/// The reader's end: a stream of [`EngineOutput`]s.
#[derive(Debug)]
pub struct OutputReader {
    slot: Arc<Mutex<Slot>>,
    done: bool,
}

pub fn output_slot() -> (OutputWriter, OutputReader) {
    let slot = Arc::new(Mutex::new(Slot::default()));
    (OutputWriter(slot.clone()), OutputReader { slot, done: false })
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl OutputWriter {
    /// Adds a token; false once the reader is gone.
    pub fn push(&self, token: u32, cached_tokens: Option<u32>, finish: Option<FinishReason>) -> bool {
        let mut s = lock(&self.0);
        if s.reader_gone {
            return false;
        }
        s.tokens.push(token);
        if s.cached_tokens.is_none() {
            s.cached_tokens = cached_tokens;
        }
        s.finish = finish;
        if std::mem::take(&mut s.reader_waiting) {
            if let Some(w) = &s.waker {
                w.wake_by_ref();
            }
        }
        true
    }
}

impl Drop for OutputWriter {
    fn drop(&mut self) {
        let mut s = lock(&self.0);
        s.writer_gone = true;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
}

impl Stream for OutputReader {
    type Item = Result<EngineOutput, EngineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut s = lock(&self.slot);
        if !s.tokens.is_empty() {
            let output = EngineOutput {
                token_ids: s.tokens.to_vec(),
                finish_reason: s.finish,
                cached_tokens: s.cached_tokens.take(),
            };
            s.tokens.clear();
            let finished = s.finish.is_some();
            drop(s);
            self.done = finished;
            return Poll::Ready(Some(Ok(output)));
        }
        if s.writer_gone {
            drop(s);
            self.done = true;
            return Poll::Ready(None);
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        s.reader_waiting = true;
        Poll::Pending
    }
}

impl Drop for OutputReader {
    fn drop(&mut self) {
        lock(&self.slot).reader_gone = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_slow_reader_gets_tokens_together_and_the_end() {
        let (w, mut r) = output_slot();
        assert!(w.push(1, Some(0), None));
        assert!(w.push(2, None, None));
        let first = r.next().await.unwrap().unwrap();
        assert_eq!(
            (first.token_ids, first.cached_tokens, first.finish_reason),
            (vec![1, 2], Some(0), None)
        );
        assert!(w.push(3, None, Some(FinishReason::Length)));
        let last = r.next().await.unwrap().unwrap();
        assert_eq!(
            (last.token_ids, last.cached_tokens, last.finish_reason),
            (vec![3], None, Some(FinishReason::Length))
        );
        assert!(r.next().await.is_none());
    }

    #[tokio::test]
    async fn either_side_going_away_is_seen() {
        let (w, mut r) = output_slot();
        drop(w);
        assert!(r.next().await.is_none(), "writer gone: the stream ends");
        let (w, r) = output_slot();
        drop(r);
        assert!(!w.push(1, None, None), "reader gone: the writer is told");
    }
}
