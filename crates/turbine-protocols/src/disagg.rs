//! Disaggregated serving on the wire: the role a worker registers with, and what the frontend
//! and the two workers tell each other so that a decode worker can fetch a prefill worker's KV.

use serde::{Deserialize, Serialize};

/// What a worker does with requests. Aggregated workers prefill and decode their own;
/// prefill workers compute prompts' KV for decode workers, which generate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerRole {
    #[default]
    Aggregated,
    Prefill,
    Decode,
}

impl WorkerRole {
    pub fn is_aggregated(&self) -> bool {
        *self == WorkerRole::Aggregated
    }

    /// Whether clients' requests may be routed to it (prefill workers only take prefills).
    pub fn generates(&self) -> bool {
        *self != WorkerRole::Prefill
    }
}

/// The phase a request is sent for, when serving is disaggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Disagg {
    /// Compute the prompt's KV and hold it for a decode worker; answer with one output
    /// carrying [`KvTransferParams`] and no tokens.
    Prefill,
    /// Fetch the prompt's KV from where `kv` says, then generate as usual.
    Decode { kv: KvTransferParams },
}

/// Where a prefill worker holds a prompt's KV: staged blocks in a region of its transfer
/// agent, under a lease. The decode worker reads them one-sidedly and checks each block's
/// header against `lease`, so a block released and reused since fails instead of decoding
/// wrong text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvTransferParams {
    /// The prefill worker's transfer agent, by its id (`AgentMetadata::uid`): how to reach
    /// it and what it is compatible with are in that worker's [`crate::discovery::ModelEntry`],
    /// read once per peer, so a request carries none of it.
    pub agent: u64,
    /// Unique per lease; every staged block's header carries it.
    pub lease: u64,
    /// The agent's region holding the staged blocks.
    pub region: u32,
    /// Bytes of one staging slot: a header, then one block's KV.
    pub slot_bytes: u64,
    /// One slot per full prompt block, in prompt order from the first block.
    pub slots: Vec<u32>,
    /// The lease ends this long after the prefill answered; reads after that fail.
    pub lease_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_phases_are_stable_on_the_wire() -> Result<(), serde_json::Error> {
        assert_eq!(serde_json::to_string(&WorkerRole::Prefill)?, r#""prefill""#);
        assert_eq!(serde_json::to_string(&Disagg::Prefill)?, r#"{"phase":"prefill"}"#);
        let kv = KvTransferParams {
            agent: 0x51,
            lease: 7,
            region: 1,
            slot_bytes: 64,
            slots: vec![3, 4],
            lease_ms: 1000,
        };
        let json = serde_json::to_string(&Disagg::Decode { kv: kv.clone() })?;
        assert!(
            json.starts_with(r#"{"phase":"decode","kv":{"agent":81,"lease":7"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Disagg>(&json)?, Disagg::Decode { kv });
        Ok(())
    }
}
