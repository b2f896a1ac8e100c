//! The echo engine: streams the prompt's tokens back, one per step, for measuring the
//! serving path's own overhead with no model in the way.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use turbine_protocols::{EngineOutput, FinishReason, OutputTokens, PreprocessedRequest};

use crate::{Engine, EngineError, EngineStream};

#[derive(Debug, Clone, Default)]
pub struct EchoConfig {
    /// Pause before each token, to stand in for decode time.
    pub delay_per_token: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct EchoEngine {
    config: EchoConfig,
}

impl EchoEngine {
    pub fn new(config: EchoConfig) -> Self {
        Self { config }
    }
}

impl Engine for EchoEngine {
    fn generate(&self, request: PreprocessedRequest, cancel: CancellationToken) -> Result<EngineStream, EngineError> {
        let delay = self.config.delay_per_token;
        let (tx, rx) = mpsc::channel(32);
        // Generation runs in its own task, as a real engine's step loop does, so that it
        // sees cancellation whether or not anyone is polling the stream.
        tokio::spawn(async move {
            for output in echo_outputs(&request) {
                if !delay.is_zero() {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                } else if cancel.is_cancelled() {
                    return;
                }
                if tx.send(Ok(output)).await.is_err() {
                    return;
                }
            }
        });
        Ok(receiver_stream(rx))
    }
}

fn receiver_stream(mut rx: mpsc::Receiver<Result<EngineOutput, EngineError>>) -> EngineStream {
    EngineStream::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// The whole output of echoing `request`: one token per output, honouring `max_tokens` and
/// stop token ids; the last output carries the finish reason.
fn echo_outputs(request: &PreprocessedRequest) -> Vec<EngineOutput> {
    let stop = &request.stop;
    let limit = stop.max_tokens.map_or(usize::MAX, |m| m as usize);
    let mut outputs = Vec::new();
    let mut finish = FinishReason::Stop;
    for (i, &token) in request.token_ids.iter().enumerate() {
        if stop.stop_token_ids.contains(&token) {
            break;
        }
        if i == limit {
            finish = FinishReason::Length;
            break;
        }
        outputs.push(EngineOutput {
            token_ids: OutputTokens::from_slice(&[token]),
            ..Default::default()
        });
    }
    match outputs.last_mut() {
        Some(last) => last.finish_reason = Some(finish),
        None => outputs.push(EngineOutput {
            token_ids: OutputTokens::new(),
            finish_reason: Some(finish),
            cached_tokens: None,
            kv_transfer: None,
        }),
    }
    // The echo engine caches nothing.
    outputs[0].cached_tokens = Some(0);
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use turbine_protocols::StopConditions;

    fn req(tokens: &[u32], max_tokens: Option<u32>, stop_token_ids: Vec<u32>) -> PreprocessedRequest {
        PreprocessedRequest {
            request_id: "r".into(),
            model: "echo".into(),
            token_ids: tokens.to_vec(),
            stop: StopConditions {
                max_tokens,
                stop_token_ids,
            },
            sampling: Default::default(),
            disagg: None,
        }
    }

    fn summary(outputs: &[EngineOutput]) -> (Vec<u32>, Option<FinishReason>) {
        let tokens = outputs.iter().flat_map(|o| o.token_ids.clone()).collect();
        (tokens, outputs.last().and_then(|o| o.finish_reason))
    }

    #[test]
    fn echo_honours_stop_conditions() {
        use FinishReason::*;
        for (tokens, max, stops, want_tokens, want_finish) in [
            (&[1, 2, 3][..], None, vec![], vec![1, 2, 3], Stop),
            (&[1, 2, 3], Some(2), vec![], vec![1, 2], Length),
            (&[1, 2, 3], Some(3), vec![], vec![1, 2, 3], Stop),
            (&[1, 2, 3], Some(0), vec![], vec![], Length),
            (&[1, 2, 3], None, vec![2], vec![1], Stop),
            (&[], None, vec![], vec![], Stop),
        ] {
            let outputs = echo_outputs(&req(tokens, max, stops));
            assert_eq!(
                summary(&outputs),
                (want_tokens, Some(want_finish)),
                "{tokens:?} max={max:?}"
            );
            assert_eq!(outputs.iter().filter(|o| o.finish_reason.is_some()).count(), 1);
            assert_eq!(outputs[0].cached_tokens, Some(0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn streams_with_delay_and_stops_when_cancelled() {
        let engine = EchoEngine::new(EchoConfig {
            delay_per_token: Duration::from_millis(10),
        });
        let start = tokio::time::Instant::now();
        let all: Vec<_> = engine
            .generate(req(&[5, 6, 7], None, vec![]), CancellationToken::new())
            .unwrap()
            .collect()
            .await;
        assert_eq!(all.len(), 3);
        assert_eq!(start.elapsed(), Duration::from_millis(30));

        let cancel = CancellationToken::new();
        let mut s = engine.generate(req(&[1; 100], None, vec![]), cancel.clone()).unwrap();
        assert!(s.next().await.is_some());
        cancel.cancel();
        let rest: Vec<_> = s.collect().await;
        assert!(
            rest.len() <= 1,
            "stops within a step of cancellation, got {} more",
            rest.len()
        );
    }
}
