//! Forecasts of the next interval's value of a series (request rate, prompt length) from
//! the intervals seen so far.

use crate::config::PredictorKind;

/// One series' forecaster. Fed one sample per interval; never forecasts below zero.
#[derive(Debug, Clone, PartialEq)]
pub enum Predictor {
    Constant {
        last: Option<f64>,
    },
    Ewma {
        alpha: f64,
        mean: Option<f64>,
    },
    Holt {
        alpha: f64,
        beta: f64,
        /// (level, trend)
        state: Option<(f64, f64)>,
    },
    Kalman(Kalman),
}

impl Predictor {
    pub fn new(kind: PredictorKind) -> Self {
        match kind {
            PredictorKind::Constant => Predictor::Constant { last: None },
            PredictorKind::Ewma { alpha } => Predictor::Ewma { alpha, mean: None },
            PredictorKind::Holt { alpha, beta } => Predictor::Holt {
                alpha,
                beta,
                state: None,
            },
            PredictorKind::Kalman { q, r } => Predictor::Kalman(Kalman::new(q, r)),
        }
    }

    /// Takes the value the last interval had.
    pub fn observe(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        match self {
            Predictor::Constant { last } => *last = Some(x),
            Predictor::Ewma { alpha, mean } => {
                *mean = Some(match *mean {
                    None => x,
                    Some(m) => *alpha * x + (1.0 - *alpha) * m,
                })
            }
            Predictor::Holt { alpha, beta, state } => {
                *state = Some(match *state {
                    None => (x, 0.0),
                    Some((level, trend)) => {
                        let next = *alpha * x + (1.0 - *alpha) * (level + trend);
                        (next, *beta * (next - level) + (1.0 - *beta) * trend)
                    }
                })
            }
            Predictor::Kalman(k) => k.observe(x),
        }
    }

    /// The next interval's expected value; `None` before the first sample.
    pub fn predict(&self) -> Option<f64> {
        let p = match self {
            Predictor::Constant { last } => *last,
            Predictor::Ewma { mean, .. } => *mean,
            Predictor::Holt { state, .. } => state.map(|(level, trend)| level + trend),
            Predictor::Kalman(k) => k.predict(),
        }?;
        Some(p.max(0.0))
    }
}

/// A local-linear-trend Kalman filter: the state is a level and its trend per interval.
///
/// Noise is scaled by the series' running magnitude, so that one setting suits a rate of
/// 0.1 and of 100 requests a second alike.
#[derive(Debug, Clone, PartialEq)]
pub struct Kalman {
    q: f64,
    r: f64,
    /// (level, trend) and its covariance.
    x: Option<[f64; 2]>,
    p: [[f64; 2]; 2],
    scale: f64,
}

impl Kalman {
    fn new(q: f64, r: f64) -> Self {
        Self {
            q,
            r,
            x: None,
            p: [[1.0, 0.0], [0.0, 1.0]],
            scale: 0.0,
        }
    }

    fn observe(&mut self, z: f64) {
        self.scale = if self.x.is_none() {
            z.abs()
        } else {
            0.9 * self.scale + 0.1 * z.abs()
        };
        let s2 = self.scale.max(1e-6).powi(2);
        let Some([level, trend]) = self.x else {
            self.x = Some([z, 0.0]);
            self.p = [[self.r * s2, 0.0], [0.0, self.r * s2]];
            return;
        };
        // Predict: level += trend; P = F P F' + Q.
        let [[a, b], [c, d]] = self.p;
        let (q, r) = (self.q * s2, self.r * s2);
        let p = [[a + b + c + d + q, b + d], [c + d, d + q]];
        let pred = [level + trend, trend];
        // Update with the level measured.
        let s = p[0][0] + r;
        let k = [p[0][0] / s, p[1][0] / s];
        let innovation = z - pred[0];
        self.x = Some([pred[0] + k[0] * innovation, pred[1] + k[1] * innovation]);
        self.p = [
            [(1.0 - k[0]) * p[0][0], (1.0 - k[0]) * p[0][1]],
            [p[1][0] - k[1] * p[0][0], p[1][1] - k[1] * p[0][1]],
        ];
    }

    fn predict(&self) -> Option<f64> {
        self.x.map(|[level, trend]| level + trend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> [PredictorKind; 4] {
        ["constant", "ewma", "holt", "kalman"].map(|n| PredictorKind::parse(n).unwrap())
    }

    #[test]
    fn a_constant_series_is_predicted_exactly_by_every_predictor() {
        for kind in kinds() {
            let mut p = Predictor::new(kind);
            assert_eq!(p.predict(), None);
            for _ in 0..20 {
                p.observe(7.0);
            }
            let got = p.predict().unwrap();
            assert!((got - 7.0).abs() < 1e-6, "{kind:?}: {got}");
        }
    }

    #[test]
    fn trend_followers_extrapolate_a_ramp_and_the_mean_lags_it() {
        let mut forecasts = Vec::new();
        for kind in kinds() {
            let mut p = Predictor::new(kind);
            for i in 0..30 {
                p.observe(10.0 + 2.0 * f64::from(i));
            }
            forecasts.push(p.predict().unwrap());
        }
        // The next value is 70: Holt and Kalman find the trend, constant repeats 68, EWMA lags.
        let [constant, ewma, holt, kalman] = forecasts[..] else {
            unreachable!()
        };
        assert_eq!(constant, 68.0);
        assert!(ewma < 68.0, "{ewma}");
        assert!((holt - 70.0).abs() < 0.5, "{holt}");
        assert!((kalman - 70.0).abs() < 1.0, "{kalman}");
    }

    #[test]
    fn a_fall_to_zero_never_forecasts_a_negative_rate() {
        for kind in kinds() {
            let mut p = Predictor::new(kind);
            for x in [100.0, 80.0, 40.0, 0.0, 0.0] {
                p.observe(x);
            }
            assert!(p.predict().unwrap() >= 0.0);
            p.observe(f64::NAN);
            assert!(p.predict().unwrap().is_finite());
        }
    }

    #[test]
    fn kalman_smooths_noise_better_than_the_last_sample() {
        // Alternating 8 and 12 around 10: the filter's forecast stays nearer 10 than the
        // constant predictor's, which is always 2 off.
        let mut k = Predictor::new(PredictorKind::Kalman { q: 0.01, r: 1.0 });
        let mut worst: f64 = 0.0;
        for i in 0..200 {
            k.observe(if i % 2 == 0 { 8.0 } else { 12.0 });
            if i > 50 {
                worst = worst.max((k.predict().unwrap() - 10.0).abs());
            }
        }
        assert!(worst < 1.0, "{worst}");
    }
}
