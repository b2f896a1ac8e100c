//! The capacity model's interpolation, its sizing helpers and its checks.

mod common;

use std::time::Duration;

use common::model;
use turbine_planner::{CapacityError, CapacityModel};

#[test]
fn points_between_measurements_are_interpolated() {
    let m = model();
    assert_eq!(m.lone_ttft(1000.0), Duration::from_millis(110));
    assert_eq!(m.lone_ttft(2500.0), Duration::from_millis(260));
    assert_eq!(m.prefill_rate(2500.0), 20_000.0);
    assert_eq!(m.itl(1000.0, 64.0), Duration::from_millis(42));
    // Halfway in both context and concurrency.
    let itl = m.itl(2000.0, 40.0).as_secs_f64() * 1000.0;
    assert!((itl - (10.0 + 0.75 * 40.0)).abs() < 1e-9, "{itl}");
}

#[test]
fn decode_concurrency_stops_at_the_itl_target_and_at_the_kv_cache() {
    let m = model();
    // 10 + 0.5 c <= 50 at c = 80.
    assert_eq!(m.decode_concurrency(1000.0, Duration::from_millis(50)), 80.0);
    // A loose target: bounded by 256 sequences, then by the KV cache at long contexts.
    assert_eq!(m.decode_concurrency(1000.0, Duration::from_secs(1)), 256.0);
    assert_eq!(m.decode_concurrency(3000.0, Duration::from_secs(1)), 87.0);
    assert_eq!(m.decode_concurrency(1000.0, Duration::from_millis(5)), 1.0);
}

#[test]
fn queueing_lowers_the_utilization_a_tight_ttft_allows() {
    let m = model();
    let loose = m.prefill_utilization(1000.0, Duration::from_secs(2), 0.8);
    let tight = m.prefill_utilization(1000.0, Duration::from_millis(200), 0.8);
    assert_eq!(loose, 0.8);
    assert!(tight < 0.7 && tight > 0.5, "{tight}");
    assert_eq!(m.prefill_utilization(4000.0, Duration::from_millis(200), 0.8), 0.1);
}

#[test]
fn broken_tables_are_refused() {
    let mut m = model();
    m.decode.pop();
    assert_eq!(
        m.validated().unwrap_err(),
        CapacityError::NotAGrid {
            context: 3000,
            concurrency: 256
        }
    );
    let mut m = model();
    m.prefill[1].tokens_per_s = f64::NAN;
    assert_eq!(
        m.validated().unwrap_err(),
        CapacityError::Invalid {
            table: "prefill",
            index: 1
        }
    );
    let m = CapacityModel {
        prefill: vec![],
        ..model()
    };
    assert_eq!(m.validated().unwrap_err(), CapacityError::Empty("prefill"));
}

#[test]
fn the_model_round_trips_through_json() {
    let m = model();
    let json = serde_json::to_string(&m).unwrap();
    let back: CapacityModel = serde_json::from_str(&json).unwrap();
    assert_eq!(back.validated().unwrap(), m);
}
