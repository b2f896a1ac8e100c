//! The planner's settings, checked once at start: an impossible configuration is refused
//! with the values that make it so, never discovered mid-run.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A pool of interchangeable workers, scaled as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// Computes prompts for decode workers (disaggregated serving).
    Prefill,
    /// Generates from prompts a prefill worker computed.
    Decode,
    /// Prefills and decodes its own requests.
    Aggregated,
}

impl PoolKind {
    pub const ALL: [PoolKind; 3] = [PoolKind::Prefill, PoolKind::Decode, PoolKind::Aggregated];

    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Prefill => "prefill",
            PoolKind::Decode => "decode",
            PoolKind::Aggregated => "aggregated",
        }
    }

    /// Parses a pool's name as flags spell it.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pool's bounds and what a replica costs (any unit: GPUs, dollars an hour).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfig {
    pub min: u32,
    pub max: u32,
    pub cost: f64,
}

/// The service level each request is held to, as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sla {
    /// Time to first token, queueing included.
    pub ttft: Duration,
    /// Mean time between a request's tokens after the first.
    pub itl: Duration,
}

/// How the slow loop forecasts the next interval's request rate and lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PredictorKind {
    /// The last interval again.
    Constant,
    /// Exponentially weighted mean; `alpha` is the newest sample's weight.
    Ewma { alpha: f64 },
    /// Holt's linear trend: level weight `alpha`, trend weight `beta`.
    Holt { alpha: f64, beta: f64 },
    /// A Kalman filter on a level and a trend, with process noise `q` and measurement
    /// noise `r` (relative to the signal's scale).
    Kalman { q: f64, r: f64 },
}

impl PredictorKind {
    /// Parses `constant`, `ewma`, `holt` or `kalman`, each with its usual weights.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "constant" => PredictorKind::Constant,
            "ewma" => PredictorKind::Ewma { alpha: 0.5 },
            "holt" => PredictorKind::Holt { alpha: 0.5, beta: 0.3 },
            "kalman" => PredictorKind::Kalman { q: 0.1, r: 1.0 },
            _ => return None,
        })
    }
}

/// Everything the policy needs besides observations and the capacity model.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConfig {
    pub pools: BTreeMap<PoolKind, PoolConfig>,
    /// Most total cost the pools may hold at once, draining and starting replicas included.
    pub budget: Option<f64>,
    pub sla: Sla,
    /// The load loop's period: queued prefill, KV usage and observed latency.
    pub fast_interval: Duration,
    /// The sizing loop's period: predicted rate and lengths through the capacity model.
    pub slow_interval: Duration,
    /// A lower size must be what both loops asked for over this long before the pool shrinks.
    pub stabilization: Duration,
    /// With nothing arriving and nothing in flight for this long, every pool goes to its minimum.
    pub idle_after: Duration,
    /// A replica still starting after this long is cancelled.
    pub start_timeout: Duration,
    pub predictor: PredictorKind,
    /// The utilisation a replica is sized to (below 1: room for bursts inside an interval).
    pub target_utilization: f64,
    /// A pool shrinks only if one replica fewer would still leave this share of the SLA as
    /// headroom (its estimated TTFT and ITL at most `1 - headroom` of the targets).
    pub scale_down_headroom: f64,
    /// KV usage above this on average means a pool needs a replica more.
    pub max_kv_usage: f64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            pools: BTreeMap::from([(
                PoolKind::Aggregated,
                PoolConfig {
                    min: 1,
                    max: 8,
                    cost: 1.0,
                },
            )]),
            budget: None,
            sla: Sla {
                ttft: Duration::from_millis(2000),
                itl: Duration::from_millis(100),
            },
            fast_interval: Duration::from_secs(1),
            slow_interval: Duration::from_secs(30),
            stabilization: Duration::from_secs(20),
            idle_after: Duration::from_secs(60),
            start_timeout: Duration::from_secs(600),
            predictor: PredictorKind::Holt { alpha: 0.5, beta: 0.3 },
            target_utilization: 0.8,
            scale_down_headroom: 0.3,
            max_kv_usage: 0.85,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("no pool to plan: give at least one of prefill, decode or aggregated")]
    NoPools,
    #[error("a disaggregated fleet needs both pools: {present} is given without {missing}")]
    HalfDisaggregated { present: PoolKind, missing: PoolKind },
    #[error("pool {pool}: min {min} is above max {max}")]
    MinAboveMax { pool: PoolKind, min: u32, max: u32 },
    #[error("pool {pool}: max must be at least 1, got 0")]
    ZeroMax { pool: PoolKind },
    #[error("pool {pool}: cost must be a finite number >= 0, got {cost}")]
    Cost { pool: PoolKind, cost: f64 },
    #[error("budget {budget} is below the pools' minimums, which cost {minimum}")]
    BudgetBelowMinimum { budget: f64, minimum: f64 },
    #[error("budget must be a finite number > 0, got {0}")]
    Budget(f64),
    #[error("{name} must be above zero, got {value:?}")]
    ZeroDuration { name: &'static str, value: Duration },
    #[error("the fast interval ({fast:?}) must not be longer than the slow one ({slow:?})")]
    FastSlowerThanSlow { fast: Duration, slow: Duration },
    #[error("{name} must be in ({low}, {high}], got {value}")]
    OutOfRange {
        name: &'static str,
        value: f64,
        low: f64,
        high: f64,
    },
}

impl PlannerConfig {
    /// Checks every value against the others.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pools.is_empty() {
            return Err(ConfigError::NoPools);
        }
        for (present, missing) in [
            (PoolKind::Prefill, PoolKind::Decode),
            (PoolKind::Decode, PoolKind::Prefill),
        ] {
            if self.pools.contains_key(&present) && !self.pools.contains_key(&missing) {
                return Err(ConfigError::HalfDisaggregated { present, missing });
            }
        }
        for (&pool, c) in &self.pools {
            if c.max == 0 {
                return Err(ConfigError::ZeroMax { pool });
            }
            if c.min > c.max {
                return Err(ConfigError::MinAboveMax {
                    pool,
                    min: c.min,
                    max: c.max,
                });
            }
            if !c.cost.is_finite() || c.cost < 0.0 {
                return Err(ConfigError::Cost { pool, cost: c.cost });
            }
        }
        if let Some(budget) = self.budget {
            if !budget.is_finite() || budget <= 0.0 {
                return Err(ConfigError::Budget(budget));
            }
            let minimum = self.minimum_cost();
            if budget < minimum {
                return Err(ConfigError::BudgetBelowMinimum { budget, minimum });
            }
        }
        for (name, value) in [
            ("ttft target", self.sla.ttft),
            ("itl target", self.sla.itl),
            ("fast interval", self.fast_interval),
            ("slow interval", self.slow_interval),
            ("idle time", self.idle_after),
            ("start timeout", self.start_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration { name, value });
            }
        }
        if self.fast_interval > self.slow_interval {
            return Err(ConfigError::FastSlowerThanSlow {
                fast: self.fast_interval,
                slow: self.slow_interval,
            });
        }
        for (name, value, low, high) in [
            ("target utilization", self.target_utilization, 0.0, 1.0),
            ("scale-down headroom", self.scale_down_headroom, -f64::EPSILON, 0.9),
            ("max KV usage", self.max_kv_usage, 0.0, 1.0),
        ] {
            if !(value > low && value <= high) {
                return Err(ConfigError::OutOfRange {
                    name,
                    value,
                    low: low.max(0.0),
                    high,
                });
            }
        }
        let weights = match self.predictor {
            PredictorKind::Constant => vec![],
            PredictorKind::Ewma { alpha } => vec![("ewma alpha", alpha)],
            PredictorKind::Holt { alpha, beta } => vec![("holt alpha", alpha), ("holt beta", beta)],
            PredictorKind::Kalman { q, r } => vec![("kalman q", q), ("kalman r", r)],
        };
        for (name, value) in weights {
            let high = if name.starts_with("kalman") { f64::MAX } else { 1.0 };
            if !(value > 0.0 && value <= high) {
                return Err(ConfigError::OutOfRange {
                    name,
                    value,
                    low: 0.0,
                    high,
                });
            }
        }
        Ok(())
    }

    /// What the pools cost at their minimums.
    pub fn minimum_cost(&self) -> f64 {
        self.pools.values().map(|c| f64::from(c.min) * c.cost).sum()
    }

    pub fn pool(&self, kind: PoolKind) -> Option<&PoolConfig> {
        self.pools.get(&kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(list: &[(PoolKind, u32, u32, f64)]) -> PlannerConfig {
        PlannerConfig {
            pools: list
                .iter()
                .map(|&(k, min, max, cost)| (k, PoolConfig { min, max, cost }))
                .collect(),
            ..PlannerConfig::default()
        }
    }

    #[test]
    fn impossible_configurations_name_their_values() {
        use PoolKind::*;
        let cases: Vec<(PlannerConfig, &str)> = vec![
            (pools(&[]), "no pool to plan"),
            (pools(&[(Prefill, 1, 2, 1.0)]), "prefill is given without decode"),
            (
                pools(&[(Aggregated, 3, 2, 1.0)]),
                "pool aggregated: min 3 is above max 2",
            ),
            (
                pools(&[(Aggregated, 0, 0, 1.0)]),
                "pool aggregated: max must be at least 1",
            ),
            (
                pools(&[(Aggregated, 0, 2, -1.0)]),
                "cost must be a finite number >= 0, got -1",
            ),
            (
                PlannerConfig {
                    budget: Some(3.0),
                    ..pools(&[(Prefill, 2, 4, 1.0), (Decode, 1, 4, 2.0)])
                },
                "budget 3 is below the pools' minimums, which cost 4",
            ),
            (
                PlannerConfig {
                    fast_interval: Duration::from_secs(60),
                    ..PlannerConfig::default()
                },
                "fast interval (60s) must not be longer than the slow one (30s)",
            ),
            (
                PlannerConfig {
                    target_utilization: 1.5,
                    ..PlannerConfig::default()
                },
                "target utilization must be in (0, 1], got 1.5",
            ),
        ];
        for (config, expected) in cases {
            let err = config.validate().expect_err(expected).to_string();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
        PlannerConfig::default().validate().unwrap();
        pools(&[(Prefill, 0, 4, 1.0), (Decode, 1, 4, 1.0)]).validate().unwrap();
    }

    #[test]
    fn pool_and_predictor_names_parse() {
        for kind in PoolKind::ALL {
            assert_eq!(PoolKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(PoolKind::parse("gpu"), None);
        for name in ["constant", "ewma", "holt", "kalman"] {
            let kind = PredictorKind::parse(name).unwrap();
            PlannerConfig {
                predictor: kind,
                ..PlannerConfig::default()
            }
            .validate()
            .unwrap();
        }
        assert_eq!(PredictorKind::parse("arima"), None);
    }
}
