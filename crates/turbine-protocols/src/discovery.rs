//! How models are registered in discovery: the key layout and the value stored there.
//!
//! `turbine/{namespace}/models/{model}/{instance_id:x}` holds a [`ModelEntry`], bound to the
//! serving instance's lease, so that a model disappears with its last instance.

use serde::{Deserialize, Serialize};

use crate::ModelCard;

/// What a worker registers for each model it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub card: ModelCard,
    /// The `namespace/component/endpoint` that serves generate requests for it.
    pub endpoint: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_keys_round_trip() {
        let key = model_key("ns", "org/model-7b", 0xabc);
        assert_eq!(key, "turbine/ns/models/org/model-7b/abc");
        assert_eq!(
            parse_model_key("ns", &key),
            Some(("org/model-7b".into(), 0xabc))
        );
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
