//! Names of endpoints and instances, and how an instance is reached.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `namespace/component/endpoint`: what a client asks for, served by any number of instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointId {
    pub namespace: String,
    pub component: String,
    pub name: String,
}

impl EndpointId {
    pub fn new(namespace: impl Into<String>, component: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            component: component.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.component, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid endpoint {0:?}: expected namespace/component/endpoint, each [A-Za-z0-9_-]+")]
pub struct ParseEndpointError(String);

impl FromStr for EndpointId {
    type Err = ParseEndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        match parts.as_slice() {
            [ns, c, e] if [ns, c, e].iter().all(|p| valid(p)) => Ok(Self::new(*ns, *c, *e)),
            _ => Err(ParseEndpointError(s.to_owned())),
        }
    }
}

/// Identifies one serving instance; random so that restarts never reuse an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub u64);

impl InstanceId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Where an instance accepts requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum InstanceAddress {
    /// Inside the process whose [`crate::Runtime`] has this id; unreachable from any other.
    Local {
        runtime_id: u64,
    },
    Tcp {
        addr: SocketAddr,
    },
}

/// One registered instance of an endpoint, as discovery stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub endpoint: EndpointId,
    pub id: InstanceId,
    pub address: InstanceAddress,
    /// Free-form data the serving side wants callers to see.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_ids_parse_and_print() {
        let e: EndpointId = "turbine/worker/generate".parse().unwrap();
        assert_eq!(e, EndpointId::new("turbine", "worker", "generate"));
        assert_eq!(e.to_string(), "turbine/worker/generate");
        for bad in ["", "a/b", "a/b/c/d", "a//c", "a/b c/d"] {
            assert!(bad.parse::<EndpointId>().is_err(), "{bad}");
        }
    }
}
