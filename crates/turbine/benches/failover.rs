//! How long a dead worker stays in a frontend's routing set, with real etcd and processes:
//! killed (SIGKILL: its TCP connections break, its lease is no longer kept alive), frozen
//! (SIGSTOP: connections stay open, only the lease lapses), and stopped gracefully (SIGTERM:
//! it revokes its lease). Each figure is the time from the signal to the frontend's
//! `/health` no longer listing the worker, polled every 5 ms; the median of REPS runs.
//!
//! `cargo bench -p turbine --bench failover [-- REPS LEASE_TTL_SECS]` (defaults: 5, 3)

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::{complete, echo_worker_args, instances, start_frontend, start_worker, wait_for_instances, Etcd};

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let reps: usize = args.first().map_or(Ok(5), |a| a.parse()).context("REPS")?;
    let ttl: u64 = args.get(1).map_or(Ok(3), |a| a.parse()).context("LEASE_TTL_SECS")?;
    anyhow::ensure!(reps > 0 && ttl > 0, "REPS and LEASE_TTL_SECS must be at least 1");
    let ttl_arg = ttl.to_string();

    let etcd = Etcd::start()?;
    let worker = echo_worker_args(&etcd.url, &ttl_arg);
    // A survivor keeps the model served, so that requests meanwhile have somewhere to go.
    let (_survivor, _) = start_worker(&worker)?;
    let (_frontend, url) = start_frontend(&["--discovery", &etcd.url])?;
    let http = reqwest::Client::new();
    wait_for_instances(&http, &url, "echo", 1, Duration::from_secs(10)).await?;

    println!("lease TTL {ttl} s, {reps} runs each: time from the signal until /health drops the worker");
    println!("| signal | median | min | max | requests meanwhile | slowest of them |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for signal in ["KILL", "STOP", "TERM"] {
        let mut times = Vec::new();
        let (mut sent, mut failed, mut slowest) = (0, 0, Duration::ZERO);
        for rep in 0..reps {
            let (mut victim, id) = start_worker(&worker)?;
            wait_for_instances(&http, &url, "echo", 2, Duration::from_secs(10)).await?;
            // Open the frontend's connection to the victim, as traffic would have.
            for i in 0..4 {
                complete(&http, &url, &format!("warm {i}")).await?;
            }
            // Signals land at different points of the keep-alive period (a third of the
            // TTL), over which the lease's remaining time varies.
            tokio::time::sleep(Duration::from_secs(ttl) / 3 * rep as u32 / reps as u32).await;
            victim.signal(signal)?;
            let start = Instant::now();
            while instances(&http, &url, "echo").await?.contains(&id) {
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(ttl + 10),
                    "SIG{signal}: worker still routed to"
                );
                // A frozen worker accepts requests and never answers, so it is sent none.
                if signal != "STOP" {
                    let sent_at = Instant::now();
                    let (status, _) = complete(&http, &url, "meanwhile").await?;
                    slowest = slowest.max(sent_at.elapsed());
                    sent += 1;
                    failed += usize::from(status != 200);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            times.push(start.elapsed());
            victim.kill()?;
        }
        times.sort();
        let (meanwhile, slowest) = if signal == "STOP" {
            ("none sent".to_owned(), "—".to_owned())
        } else {
            (
                format!("{failed} of {sent} failed"),
                format!("{:.1} ms", slowest.as_secs_f64() * 1e3),
            )
        };
        println!(
            "| SIG{signal} | {} | {} | {} | {meanwhile} | {slowest} |",
            ms(times[times.len() / 2]),
            ms(times[0]),
            ms(times[times.len() - 1]),
        );
    }
    Ok(())
}
