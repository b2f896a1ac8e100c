//! Order statistics of latency samples.

use serde::{Deserialize, Serialize};

/// Mean and percentiles of a sample, in the unit of the sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Distribution {
    /// `None` for an empty sample. NaNs are dropped.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| !v.is_nan());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Self {
            count: values.len(),
            mean: values.iter().sum::<f64>() / values.len() as f64,
            min: values[0],
            p50: percentile(&values, 50.0),
            p90: percentile(&values, 90.0),
            p99: percentile(&values, 99.0),
            max: values[values.len() - 1],
        })
    }

    /// Every figure multiplied by `k` (e.g. seconds to milliseconds).
    pub fn scaled(self, k: f64) -> Self {
        Self {
            mean: self.mean * k,
            min: self.min * k,
            p50: self.p50 * k,
            p90: self.p90 * k,
            p99: self.p99 * k,
            max: self.max * k,
            ..self
        }
    }
}

/// The `q`th percentile of sorted values, interpolating linearly between the two nearest ranks
/// (numpy's default), so that small samples do not jump from one value to the next.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = (q / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy() {
        // numpy.percentile([1..10], [50, 90, 99]) = 5.5, 9.1, 9.91
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        let d = Distribution::of(v.into_iter().rev().collect()).unwrap();
        assert_eq!((d.min, d.max, d.count), (1.0, 10.0, 10));
        assert!((d.p50 - 5.5).abs() < 1e-12);
        assert!((d.p90 - 9.1).abs() < 1e-12);
        assert!((d.p99 - 9.91).abs() < 1e-12);
        assert!((d.mean - 5.5).abs() < 1e-12);
    }

    #[test]
    fn edge_samples() {
        assert_eq!(Distribution::of(vec![]), None);
        assert_eq!(Distribution::of(vec![f64::NAN]), None);
        let one = Distribution::of(vec![4.0]).unwrap();
        assert_eq!((one.p50, one.p99), (4.0, 4.0));
        let ms = Distribution::of(vec![0.001, 0.003]).unwrap().scaled(1000.0);
        assert!((ms.p50 - 2.0).abs() < 1e-9);
    }
}
