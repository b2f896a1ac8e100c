//! The planner: decides how many replicas each worker pool should run, from what the
//! frontend and the workers observe, and proves its decisions in simulated time.
//!
//! - [`config`]: pools with their limits and costs, the SLA, the loops' periods; checked once.
//! - [`predict`]: forecasts of the request rate and lengths (constant, EWMA, Holt, Kalman).
//! - [`capacity`]: what one replica sustains within the SLA, interpolated from the tables
//!   `turbine profile` measures.
//! - [`policy`]: [`decide`], a pure function of the planner's state, an observation and the
//!   time, that returns each pool's target with its reason. It does no I/O.
//! - [`profile`]: measures a capacity model on a simulated replica.
//! - [`sim`]: a discrete-event simulation of a fleet (any [`sim::SimWorker`]) replaying a
//!   trace under the planner or a static size, measuring SLO attainment and worker-seconds.
//!
//! Connectors (starting and stopping real workers) live above this crate: it never touches
//! a process, a socket or an engine.

pub mod capacity;
pub mod config;
pub mod observe;
pub mod policy;
pub mod predict;
pub mod profile;
pub mod sim;

pub use capacity::{CapacityError, CapacityModel};
pub use config::{ConfigError, PlannerConfig, PoolConfig, PoolKind, PredictorKind, Sla};
pub use observe::{Observation, Phase, PoolObservation, WorkerObservation};
pub use policy::{decide, need_for, Decision, PlannerState, Reason, Target};
pub use predict::Predictor;
