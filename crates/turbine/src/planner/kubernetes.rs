//! The Kubernetes connector: a pool is a Deployment, scaled through its `scale`
//! subresource. Every tick it reads the Deployment back, so the pool's size is what the
//! cluster says (an operator's `kubectl scale` is seen, not fought) and the planner's own
//! changes count only once the API server has them. Pods drain as Kubernetes stops them:
//! SIGTERM, then the worker's grace period within the pod's termination grace period.
//!
//! It speaks plain HTTP: run it against `kubectl proxy` (a sidecar, or on the operator's
//! machine), which holds the credentials and the TLS. No API server can run on this
//! project's machines, so it is tested against a fake one that answers the same paths.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use turbine_planner::{Phase, WorkerObservation};

pub struct KubeConnector {
    http: reqwest::Client,
    /// `.../apis/apps/v1/namespaces/{ns}/deployments/{name}`.
    deployment: String,
}

/// A Deployment's replica counts, as its spec and status give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    /// Asked for.
    pub spec: u32,
    /// Pods that exist, terminating ones included.
    pub existing: u32,
    pub ready: u32,
}

impl KubeConnector {
    /// `api` is the API server's base URL (`http://127.0.0.1:8001` behind `kubectl proxy`).
    pub fn new(api: &str, namespace: &str, deployment: &str) -> anyhow::Result<Self> {
        let api = api.trim_end_matches('/');
        if !api.starts_with("http://") {
            bail!("--kube-api must be an http:// URL (kubectl proxy), got {api:?}");
        }
        for (flag, value) in [("--kube-namespace", namespace), ("--kube-deployment", deployment)] {
            let valid = !value.is_empty()
                && value.len() <= 253
                && value
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !valid {
                bail!("{flag} must be a Kubernetes name (lowercase letters, digits, '-', '.'), got {value:?}");
            }
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            deployment: format!("{api}/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}"),
        })
    }

    /// The Deployment's counts now.
    pub async fn replicas(&self) -> anyhow::Result<Replicas> {
        let r = self
            .http
            .get(&self.deployment)
            .send()
            .await
            .context("reading the Deployment")?;
        let status = r.status();
        let body: Value = r.json().await.context("reading the Deployment")?;
        if !status.is_success() {
            bail!(
                "reading the Deployment: {status}: {}",
                body["message"].as_str().unwrap_or_default()
            );
        }
        let count = |v: &Value| v.as_u64().map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        Ok(Replicas {
            spec: count(&body["spec"]["replicas"]),
            existing: count(&body["status"]["replicas"]),
            ready: count(&body["status"]["readyReplicas"]),
        })
    }

    /// Asks for `replicas` through the scale subresource.
    pub async fn scale(&self, replicas: u32) -> anyhow::Result<()> {
        let r = self
            .http
            .patch(format!("{}/scale", self.deployment))
            .header("content-type", "application/merge-patch+json")
            .body(json!({"spec": {"replicas": replicas}}).to_string())
            .send()
            .await
            .context("scaling the Deployment")?;
        let status = r.status();
        if !status.is_success() {
            let body: Value = r.json().await.unwrap_or_default();
            bail!(
                "scaling the Deployment to {replicas}: {status}: {}",
                body["message"].as_str().unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// The pool as the planner sees a Deployment: ready pods, pods asked for and not ready
/// (starting), and pods beyond the spec (terminating, so draining). Pods are not told
/// apart, so their ids are positions, and their loads are unknown (zero).
pub fn observe(r: Replicas, now: Duration) -> Vec<WorkerObservation> {
    let ready = r.ready.min(r.spec);
    let starting = r.spec - ready;
    let draining = r.existing.saturating_sub(r.spec);
    let mut out = Vec::new();
    let mut id = 0u64;
    for (n, phase) in [
        (ready, Phase::Ready),
        (starting, Phase::Starting { since: now }),
        (draining, Phase::Draining { since: now }),
    ] {
        for _ in 0..n {
            id += 1;
            out.push(WorkerObservation::unloaded(id, phase));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_naming_them() {
        let err = |api: &str, ns: &str, name: &str| KubeConnector::new(api, ns, name).err().map(|e| e.to_string());
        assert!(err("https://10.0.0.1:6443", "ns", "w")
            .unwrap()
            .contains("\"https://10.0.0.1:6443\""));
        assert!(err("http://127.0.0.1:8001", "Serving", "w")
            .unwrap()
            .contains("--kube-namespace"));
        assert!(err("http://127.0.0.1:8001", "ns", "")
            .unwrap()
            .contains("--kube-deployment"));
        assert!(err("http://127.0.0.1:8001/", "ns", "workers-1").is_none());
    }

    #[test]
    fn a_deployment_s_counts_become_ready_starting_and_draining_replicas() {
        let phases = |spec, existing, ready| -> Vec<&'static str> {
            observe(Replicas { spec, existing, ready }, Duration::ZERO)
                .iter()
                .map(|w| match w.phase {
                    Phase::Ready => "ready",
                    Phase::Starting { .. } => "starting",
                    Phase::Draining { .. } => "draining",
                })
                .collect()
        };
        assert_eq!(phases(3, 3, 3), ["ready"; 3]);
        // Scaled up to 4, one pod not ready yet.
        assert_eq!(phases(4, 4, 3), ["ready", "ready", "ready", "starting"]);
        // Scaled down to 2, a third pod still terminating.
        assert_eq!(phases(2, 3, 3), ["ready", "ready", "draining"]);
    }
}
