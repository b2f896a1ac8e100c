//! How models are registered in discovery: the key layout and the value stored there.
//!
//! `turbine/{namespace}/models/{model}/{instance_id:x}` holds a [`ModelEntry`], bound to the
//! serving instance's lease, so that a model disappears with its last instance.

use serde::{Deserialize, Serialize};

use crate::{ModelCard, WorkerRole};

/// What a worker registers for each model it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub card: ModelCard,
    /// The `namespace/component/endpoint` that serves generate requests for it.
    pub endpoint: String,
    /// Where the worker answers [`crate::kv::KvStateRequest`]s, under the same instance id;
    /// absent for engines that publish no KV events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_state_endpoint: Option<String>,
    /// Aggregated unless the worker was started for one phase of disaggregated serving.
    #[serde(default, skip_serializing_if = "WorkerRole::is_aggregated")]
    pub role: WorkerRole,
}

/// Prefix under which the disaggregated workers of `namespace` publish their transfer
/// agents' metadata (`turbine_transfer::AgentMetadata`, as JSON), once for their peers.
/// Apart from the model entries, and under a lease of its own, because an agent must stay
/// findable while its worker drains: routers stop choosing the worker, but decode workers
/// may still have to read the blocks it staged.
pub fn transfer_agents_prefix(namespace: &str) -> String {
    format!("turbine/{namespace}/transfer-agents/")
}

pub fn transfer_agent_key(namespace: &str, agent_uid: u64) -> String {
    format!("{}{agent_uid:016x}", transfer_agents_prefix(namespace))
}

/// Prefix under which every model of `namespace` is registered.
pub fn models_prefix(namespace: &str) -> String {
    format!("turbine/{namespace}/models/")
}

pub fn model_key(namespace: &str, model: &str, instance_id: u64) -> String {
    format!("{}{model}/{instance_id:x}", models_prefix(namespace))
}

/// The model name and instance id of a key under [`models_prefix`], if it is one.
pub fn parse_model_key(namespace: &str, key: &str) -> Option<(String, u64)> {
    let rest = key.strip_prefix(&models_prefix(namespace))?;
    let (model, id) = rest.rsplit_once('/')?;
    if model.is_empty() {
        return None;
    }
    Some((model.to_owned(), u64::from_str_radix(id, 16).ok()?))
}

/// Event-plane subject of a model's KV events: `turbine.{namespace}.kv_events.{model}`.
pub fn kv_events_subject(namespace: &str, model: &str) -> String {
    format!(
        "turbine.{}.kv_events.{}",
        subject_token(namespace),
        subject_token(model)
    )
}

/// Subject pattern matching every model's KV events in `namespace`.
pub fn kv_events_pattern(namespace: &str) -> String {
    format!("turbine.{}.kv_events.>", subject_token(namespace))
}

/// Event-plane subject of a model's load reports: `turbine.{namespace}.load.{model}`.
pub fn load_subject(namespace: &str, model: &str) -> String {
    format!("turbine.{}.load.{}", subject_token(namespace), subject_token(model))
}

/// Event-plane subject where the routers of a namespace share their active-request changes.
pub fn router_sync_subject(namespace: &str) -> String {
    format!("turbine.{}.router_sync", subject_token(namespace))
}

/// Subject pattern matching every model's load reports in `namespace`.
pub fn load_pattern(namespace: &str) -> String {
    format!("turbine.{}.load.>", subject_token(namespace))
}

/// A name made safe as one subject token: dots, wildcards and whitespace become `_`.
fn subject_token(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_are_single_tokens_per_name() {
        assert_eq!(
            kv_events_subject("ns", "org/Llama-3.1 8B"),
            "turbine.ns.kv_events.org/Llama-3_1_8B"
        );
        assert_eq!(load_subject("a.b", "m"), "turbine.a_b.load.m");
    }

    use super::*;

    #[test]
    fn model_keys_round_trip() {
        let key = model_key("ns", "org/model-7b", 0xabc);
        assert_eq!(key, "turbine/ns/models/org/model-7b/abc");
        assert_eq!(parse_model_key("ns", &key), Some(("org/model-7b".into(), 0xabc)));
        for bad in [
            "turbine/ns/models/m",
            "turbine/ns/models/m/xyz",
            "turbine/other/models/m/1",
            "turbine/ns/models//1",
        ] {
            assert_eq!(parse_model_key("ns", bad), None, "{bad}");
        }
    }
}
