//! The local connector: runs a pool as `turbine worker` processes on this machine. It starts
//! one per replica asked for and counts it ready once it has registered (its stdout says
//! so), drains one by SIGTERM (the worker leaves discovery, finishes what it has within its
//! grace period, and the frontend migrates what is cut at the end), restarts one that dies
//! without being asked to, and kills a start that outlives its timeout. One worker's fate
//! never touches the others'.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use turbine_planner::{Phase, WorkerObservation};

/// What a worker process printed that the connector cares about.
enum Line {
    Registered { instance: String },
    Metrics { url: String },
}

struct Process {
    child: Child,
    started: Instant,
    /// Its instance id once registered, and where its metrics are served.
    instance: Option<String>,
    metrics: Option<String>,
    /// When it was sent SIGTERM.
    draining: Option<Instant>,
    lines: mpsc::UnboundedReceiver<Line>,
}

/// Counts of what happened to the pool's processes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LocalStats {
    pub started: u64,
    pub drained: u64,
    pub restarted: u64,
    pub cancelled: u64,
}

pub struct LocalConnector {
    exe: PathBuf,
    /// `turbine worker` arguments, the same for every replica.
    args: Vec<String>,
    /// Given to each worker as its grace period: how long a drain lets requests finish.
    drain_deadline: Duration,
    processes: BTreeMap<u64, Process>,
    next_id: u64,
    epoch: Instant,
    stats: LocalStats,
}

impl LocalConnector {
    /// Workers will run `exe worker ARGS`; `epoch` is the planner's time zero.
    pub fn new(exe: PathBuf, args: Vec<String>, drain_deadline: Duration, epoch: Instant) -> Self {
        Self {
            exe,
            args,
            drain_deadline,
            processes: BTreeMap::new(),
            next_id: 0,
            epoch,
            stats: LocalStats::default(),
        }
    }

    pub fn stats(&self) -> LocalStats {
        self.stats
    }

    /// Starts one more worker process; its id in the pool.
    pub fn start(&mut self) -> anyhow::Result<u64> {
        let mut command = Command::new(&self.exe);
        command
            .arg("worker")
            .args(&self.args)
            .args(["--metrics-port", "0", "--grace-period-secs"])
            .arg(self.drain_deadline.as_secs().max(1).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {} worker", self.exe.display()))?;
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let parsed = if let Some(rest) = line.strip_prefix("turbine: worker ") {
                    rest.split(' ').next().map(|id| Line::Registered {
                        instance: id.to_owned(),
                    })
                } else {
                    line.strip_prefix("turbine: metrics on ").map(|url| Line::Metrics {
                        url: url.trim().to_owned(),
                    })
                };
                if let Some(l) = parsed {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            }
        });
        self.next_id += 1;
        self.processes.insert(
            self.next_id,
            Process {
                child,
                started: Instant::now(),
                instance: None,
                metrics: None,
                draining: None,
                lines,
            },
        );
        self.stats.started += 1;
        Ok(self.next_id)
    }

    /// Asks worker `id` to drain and stop (SIGTERM). False if it is not running.
    pub fn drain(&mut self, id: u64) -> bool {
        let Some(p) = self.processes.get_mut(&id) else {
            return false;
        };
        if p.draining.is_some() {
            return true;
        }
        // A worker still starting has nothing to drain: it stops on the same signal.
        if terminate(&p.child) {
            p.draining = Some(Instant::now());
            self.stats.drained += 1;
            true
        } else {
            false
        }
    }

    /// Kills worker `id` at once: a start that never registered.
    pub fn cancel(&mut self, id: u64) {
        if let Some(mut p) = self.processes.remove(&id) {
            let _ = p.child.start_kill();
            self.stats.cancelled += 1;
            tokio::spawn(async move {
                let _ = p.child.wait().await;
            });
        }
    }

    /// Reads what the workers printed, reaps those that ended, restarts those that died
    /// unasked, and kills drained ones still running well past their deadline.
    pub fn poll(&mut self) -> anyhow::Result<()> {
        let mut ended = Vec::new();
        for (&id, p) in self.processes.iter_mut() {
            while let Ok(line) = p.lines.try_recv() {
                match line {
                    Line::Registered { instance } => p.instance = Some(instance),
                    Line::Metrics { url } => p.metrics = Some(url),
                }
            }
            match p.child.try_wait() {
                Ok(Some(status)) => ended.push((id, p.draining.is_some(), status)),
                Ok(None) => {
                    if p.draining
                        .is_some_and(|t| t.elapsed() > self.drain_deadline + Duration::from_secs(30))
                    {
                        let _ = p.child.start_kill();
                    }
                }
                Err(e) => tracing::warn!(worker = id, error = %e, "cannot read the worker's status"),
            }
        }
        for (id, asked, status) in ended {
            self.processes.remove(&id);
            if !asked {
                tracing::warn!(worker = id, %status, "worker exited unasked: starting another");
                self.stats.restarted += 1;
                self.start()?;
            }
        }
        Ok(())
    }

    /// The pool as the planner sees it; loads are filled in by whoever reads the workers'
    /// metrics.
    pub fn observe(&self) -> Vec<(WorkerObservation, Option<&str>)> {
        self.processes
            .iter()
            .map(|(&id, p)| {
                let since = |t: Instant| t.saturating_duration_since(self.epoch);
                let phase = match (p.draining, &p.instance) {
                    (Some(t), _) => Phase::Draining { since: since(t) },
                    (None, Some(_)) => Phase::Ready,
                    (None, None) => Phase::Starting {
                        since: since(p.started),
                    },
                };
                (WorkerObservation::unloaded(id, phase), p.metrics.as_deref())
            })
            .collect()
    }

    /// Drains every worker and waits for them to end (at most the drain deadline and a
    /// little more each).
    pub async fn shutdown(&mut self) {
        let ids: Vec<u64> = self.processes.keys().copied().collect();
        for id in ids {
            self.drain(id);
        }
        let deadline = tokio::time::Instant::now() + self.drain_deadline + Duration::from_secs(10);
        for (_, mut p) in std::mem::take(&mut self.processes) {
            if tokio::time::timeout_at(deadline, p.child.wait()).await.is_err() {
                let _ = p.child.start_kill();
                let _ = p.child.wait().await;
            }
        }
    }
}

/// Sends SIGTERM: the worker's own signal handling drains it.
#[cfg(unix)]
fn terminate(child: &Child) -> bool {
    let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok()
}

/// No SIGTERM here: a worker cannot be drained, only killed.
#[cfg(not(unix))]
fn terminate(_child: &Child) -> bool {
    false
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;

    /// A stand-in for `turbine`: `worker` prints the registration line (unless told to
    /// hang) and sleeps; SIGTERM ends it.
    fn fake_turbine(dir: &std::path::Path, registers: bool) -> PathBuf {
        let path = dir.join(if registers { "turbine" } else { "turbine-hangs" });
        let say = if registers {
            "echo \"turbine: worker $$ serving mocker\""
        } else {
            ":"
        };
        let script = format!("#!/bin/sh\n{say}\nexec sleep 600\n");
        std::fs::write(&path, script).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
        path
    }

    async fn until(connector: &mut LocalConnector, done: impl Fn(&LocalConnector) -> bool) {
        for _ in 0..200 {
            connector.poll().unwrap();
            if done(connector) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the workers never got there");
    }

    fn ready(c: &LocalConnector) -> usize {
        c.observe().iter().filter(|(w, _)| w.phase == Phase::Ready).count()
    }

    #[tokio::test]
    async fn a_worker_that_dies_unasked_is_replaced_and_a_drained_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let exe = fake_turbine(dir.path(), true);
        let mut c = LocalConnector::new(exe, vec![], Duration::from_secs(1), Instant::now());
        let first = c.start().unwrap();
        let second = c.start().unwrap();
        until(&mut c, |c| ready(c) == 2).await;
        // A crash: the process is killed from outside.
        let pid = c.processes[&first].child.id().unwrap();
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        until(&mut c, |c| c.stats().restarted == 1 && ready(c) == 2).await;
        assert!(
            !c.processes.contains_key(&first),
            "the dead one is gone, another took its place"
        );
        // A drain: SIGTERM ends it and nothing replaces it.
        assert!(c.drain(second));
        until(&mut c, |c| c.observe().len() == 1).await;
        assert_eq!(
            c.stats(),
            LocalStats {
                started: 3,
                drained: 1,
                restarted: 1,
                cancelled: 0
            }
        );
        c.shutdown().await;
        assert!(c.processes.is_empty());
    }

    #[tokio::test]
    async fn a_start_that_never_registers_stays_starting_until_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let exe = fake_turbine(dir.path(), false);
        let mut c = LocalConnector::new(exe, vec![], Duration::from_secs(1), Instant::now());
        let id = c.start().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.poll().unwrap();
        assert!(matches!(c.observe()[0].0.phase, Phase::Starting { .. }));
        c.cancel(id);
        assert!(c.observe().is_empty());
        assert_eq!(c.stats().cancelled, 1);
    }
}
