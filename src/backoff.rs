//! Restart schedules: how long a crashed role waits before it is started
//! again, and when its supervisor stops trying.
//!
//! [`BackoffPolicy`] is the configuration; [`RestartTracker`] applies it to a
//! sequence of crashes. The tracker is pure: the caller passes the clock
//! reading and the random number generator, so a test can replay any
//! schedule exactly.
//!
//! # The schedule
//!
//! Restarts are numbered by `attempt`, starting at 1 for the first restart
//! after a stable run. Attempt `n` waits
//!
//! ```text
//! nominal(n) = min(cap, base × factor^(n − 1))
//! delay(n)   = min(cap, nominal(n) × (1 + u)),  u uniform in [−jitter, +jitter]
//! ```
//!
//! so `cap` is the longest any restart waits, jitter included. An instance
//! that ran for at least `reset_after` before it crashed counts as stable:
//! its restart is attempt 1 again. Independently of the attempt count, at
//! most `budget.max_restarts` restarts are granted within any sliding
//! `budget.window`; the crash that would exceed that gives up with
//! [`GiveUpReason::BudgetExhausted`], and every later crash gives up too.
//!
//! With the defaults (base 100 ms, factor 2, cap 30 s, jitter ±10 %, reset
//! after 60 s, 10 restarts per 10 minutes) the nominal delays are 0.1, 0.2,
//! 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6 and 30 s. A role that crashes as soon
//! as it starts is restarted ten times over about 81 s and given up at its
//! eleventh crash. The window is ten minutes rather than one because, with
//! a 30 s cap, ten restarts can never fit in 60 s once the delays have grown,
//! and such a budget would never be exhausted.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

/// Default delay before the first restart.
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(100);
/// Default growth of the delay from one attempt to the next.
pub const DEFAULT_FACTOR: f64 = 2.0;
/// Default longest delay before a restart.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30);
/// Default jitter: each delay is moved by up to ±10 %.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Default uptime after which an instance counts as stable.
pub const DEFAULT_RESET_AFTER: Duration = Duration::from_secs(60);
/// Default number of restarts granted within [`DEFAULT_BUDGET_WINDOW`].
pub const DEFAULT_MAX_RESTARTS: u32 = 10;
/// Default length of the sliding window the restart budget is counted in.
pub const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(600);

/// When and how often a crashed role is restarted. See the
/// [module documentation](self) for the exact schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffPolicy {
    /// Delay before attempt 1.
    pub base: Duration,
    /// Each attempt waits `factor` times the one before (before the cap).
    /// Values below 1 (or not finite) are treated as 1.
    pub factor: f64,
    /// The longest delay, jitter included.
    pub cap: Duration,
    /// Fraction by which a delay is moved at random, e.g. `0.1` for ±10 %.
    /// Clamped to `0.0..=1.0`.
    pub jitter: f64,
    /// Uptime after which an instance counts as stable, so that its next
    /// crash starts again at attempt 1.
    pub reset_after: Duration,
    /// How many restarts are granted within a sliding window.
    pub budget: RestartBudget,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: DEFAULT_BASE_DELAY,
            factor: DEFAULT_FACTOR,
            cap: DEFAULT_MAX_DELAY,
            jitter: DEFAULT_JITTER,
            reset_after: DEFAULT_RESET_AFTER,
            budget: RestartBudget::default(),
        }
    }
}

/// At most `max_restarts` restarts within any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBudget {
    pub max_restarts: u32,
    pub window: Duration,
}

impl Default for RestartBudget {
    fn default() -> Self {
        Self {
            max_restarts: DEFAULT_MAX_RESTARTS,
            window: DEFAULT_BUDGET_WINDOW,
        }
    }
}

/// A policy value that makes no sense, found by [`BackoffPolicy::validate`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("backoff base delay {base:?} exceeds the cap {cap:?}")]
    BaseExceedsCap { base: Duration, cap: Duration },
    #[error("backoff factor must be a finite number of at least 1, got {0}")]
    Factor(f64),
    #[error("backoff jitter must be between 0 and 1, got {0}")]
    Jitter(f64),
    #[error("the restart budget window must be longer than zero")]
    EmptyWindow,
}

impl BackoffPolicy {
    /// Check that every value means what it says, for configuration loaded
    /// from outside. A policy that fails is still usable: the tracker reads
    /// an out-of-range factor or jitter as its nearest sensible value.
    ///
    /// # Errors
    ///
    /// [`PolicyError::BaseExceedsCap`] when `base > cap`,
    /// [`PolicyError::Factor`] when `factor` is below 1 or not finite,
    /// [`PolicyError::Jitter`] when `jitter` is outside `0.0..=1.0`,
    /// [`PolicyError::EmptyWindow`] when the budget window is zero.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.base > self.cap {
            return Err(PolicyError::BaseExceedsCap {
                base: self.base,
                cap: self.cap,
            });
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(PolicyError::Factor(self.factor));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(PolicyError::Jitter(self.jitter));
        }
        if self.budget.window.is_zero() {
            return Err(PolicyError::EmptyWindow);
        }
        Ok(())
    }

    /// The delay of `attempt` before jitter: `min(cap, base × factor^(attempt − 1))`.
    /// Attempt 0 is read as attempt 1.
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let nanos = self.base.as_nanos() as f64 * self.factor().powi(exponent);
        self.capped(nanos)
    }

    /// The shortest and longest delay `attempt` can get, jitter included.
    pub fn delay_bounds(&self, attempt: u32) -> (Duration, Duration) {
        let nominal = self.nominal_delay(attempt).as_nanos() as f64;
        let jitter = self.jitter();
        (
            self.capped(nominal * (1.0 - jitter)),
            self.capped(nominal * (1.0 + jitter)),
        )
    }

    /// The delay of `attempt` with jitter drawn from `rng`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let nominal = self.nominal_delay(attempt).as_nanos() as f64;
        let jitter = self.jitter();
        if jitter == 0.0 {
            return self.capped(nominal);
        }
        let spread: f64 = rng.gen_range(-jitter..=jitter);
        self.capped(nominal * (1.0 + spread))
    }

    fn factor(&self) -> f64 {
        if self.factor.is_finite() && self.factor >= 1.0 {
            self.factor
        } else {
            1.0
        }
    }

    fn jitter(&self) -> f64 {
        if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// `nanos` as a duration no longer than the cap. Computing in
    /// nanoseconds keeps whole-millisecond schedules exact.
    fn capped(&self, nanos: f64) -> Duration {
        let cap = self.cap.as_nanos() as f64;
        if nanos.is_nan() || nanos >= cap {
            return self.cap;
        }
        Duration::from_nanos(nanos.max(0.0).round() as u64)
    }
}

/// What to do about one crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start a new instance after `delay`; this is restart number `attempt`
    /// since the last stable run.
    Restart { attempt: u32, delay: Duration },
    /// Stop restarting, for good.
    GiveUp(GiveUpReason),
}

/// Why a supervisor stopped restarting a role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GiveUpReason {
    /// The role already had `restarts` restarts within `window`.
    #[error("restart budget exhausted: {restarts} restarts within {window:?}")]
    BudgetExhausted { restarts: u32, window: Duration },
}

/// Applies a [`BackoffPolicy`] to the crashes of one role.
///
/// Call [`on_start`](Self::on_start) each time an instance starts and
/// [`on_crash`](Self::on_crash) each time one crashes. Both take the current
/// time from the caller; nothing here reads a clock or sleeps.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: BackoffPolicy,
    attempt: u32,
    started_at: Option<Instant>,
    /// When each restart still inside the budget window was granted, oldest
    /// first.
    granted: VecDeque<Instant>,
    gave_up: Option<GiveUpReason>,
}

impl RestartTracker {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            attempt: 0,
            started_at: None,
            granted: VecDeque::new(),
            gave_up: None,
        }
    }

    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }

    /// The attempt number of the latest restart; 0 before the first one.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Why the tracker gave up, once it has.
    pub fn gave_up(&self) -> Option<&GiveUpReason> {
        self.gave_up.as_ref()
    }

    /// Record that an instance started at `now`. Its uptime at the next
    /// crash decides whether that crash starts again at attempt 1.
    pub fn on_start(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// Decide what to do about a crash at `now`, drawing jitter from `rng`.
    ///
    /// A crash with no [`on_start`](Self::on_start) before it counts as a
    /// crash at once (no reset). Once this has returned
    /// [`Decision::GiveUp`], it returns the same for every later crash.
    pub fn on_crash<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) -> Decision {
        if let Some(reason) = &self.gave_up {
            return Decision::GiveUp(reason.clone());
        }

        // A stable run earns a fresh schedule, but not a fresh budget: the
        // window below still remembers recent restarts.
        let uptime = self
            .started_at
            .take()
            .map(|started| now.saturating_duration_since(started));
        if uptime.is_some_and(|uptime| uptime >= self.policy.reset_after) {
            self.attempt = 0;
        }

        let window = self.policy.budget.window;
        while self
            .granted
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) >= window)
        {
            self.granted.pop_front();
        }
        let used = u32::try_from(self.granted.len()).unwrap_or(u32::MAX);
        if used >= self.policy.budget.max_restarts {
            let reason = GiveUpReason::BudgetExhausted {
                restarts: used,
                window,
            };
            self.gave_up = Some(reason.clone());
            return Decision::GiveUp(reason);
        }

        self.granted.push_back(now);
        self.attempt = self.attempt.saturating_add(1);
        Decision::Restart {
            attempt: self.attempt,
            delay: self.policy.delay(self.attempt, rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn exact(policy: BackoffPolicy) -> BackoffPolicy {
        BackoffPolicy {
            jitter: 0.0,
            ..policy
        }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    /// Crash `count` times in a row, each instance dying `uptime` after its
    /// start and each restart taking exactly its delay; returns the
    /// decisions and the time of the last crash.
    fn crash_loop(
        tracker: &mut RestartTracker,
        start: Instant,
        uptime: Duration,
        count: usize,
    ) -> (Vec<Decision>, Instant) {
        let mut rng = rng();
        let mut now = start;
        let mut decisions = Vec::new();
        for _ in 0..count {
            tracker.on_start(now);
            now += uptime;
            let decision = tracker.on_crash(now, &mut rng);
            if let Decision::Restart { delay, .. } = decision {
                now += delay;
            }
            decisions.push(decision);
        }
        (decisions, now)
    }

    fn delays(decisions: &[Decision]) -> Vec<Duration> {
        decisions
            .iter()
            .filter_map(|decision| match decision {
                Decision::Restart { delay, .. } => Some(*delay),
                Decision::GiveUp(_) => None,
            })
            .collect()
    }

    #[test]
    fn restart_delay_doubles_until_the_cap() {
        let policy = exact(BackoffPolicy {
            cap: ms(1000),
            ..BackoffPolicy::default()
        });
        let mut tracker = RestartTracker::new(policy);

        let (decisions, _) = crash_loop(&mut tracker, Instant::now(), Duration::ZERO, 7);

        let expected = [100, 200, 400, 800, 1000, 1000, 1000].map(ms);
        assert_eq!(delays(&decisions), expected);
        let attempts: Vec<u32> = decisions
            .iter()
            .map(|decision| match decision {
                Decision::Restart { attempt, .. } => *attempt,
                Decision::GiveUp(reason) => panic!("gave up: {reason}"),
            })
            .collect();
        assert_eq!(attempts, [1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn the_default_policy_follows_the_documented_schedule() {
        let policy = BackoffPolicy::default();
        let nominal: Vec<Duration> = (1..=11)
            .map(|attempt| policy.nominal_delay(attempt))
            .collect();

        let expected = [
            100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000,
        ]
        .map(ms);
        assert_eq!(nominal, expected);
        assert_eq!(
            policy.budget,
            RestartBudget {
                max_restarts: 10,
                window: ms(600_000)
            }
        );
        assert_eq!(policy.reset_after, ms(60_000));
        assert_eq!(policy.validate(), Ok(()));
    }

    #[test]
    fn an_instantly_crashing_role_is_given_up_at_its_eleventh_crash_with_the_defaults() {
        let mut tracker = RestartTracker::new(exact(BackoffPolicy::default()));
        let start = Instant::now();

        let (decisions, end) = crash_loop(&mut tracker, start, Duration::ZERO, 11);

        assert_eq!(delays(&decisions).len(), 10);
        assert!(
            matches!(decisions[10], Decision::GiveUp(_)),
            "{:?}",
            decisions[10]
        );
        assert_eq!(end - start, ms(81_100));
    }

    #[test]
    fn jittered_delays_stay_within_the_bounds() {
        let policy = BackoffPolicy {
            jitter: 0.25,
            ..BackoffPolicy::default()
        };
        let mut rng = rng();

        for attempt in 1..=12 {
            let nominal = policy.nominal_delay(attempt).as_secs_f64();
            let (low, high) = policy.delay_bounds(attempt);
            assert!(
                (low.as_secs_f64() - nominal * 0.75).abs() < 1e-6,
                "attempt {attempt}"
            );
            assert!(high <= policy.cap, "attempt {attempt}");
            let drawn: Vec<Duration> = (0..200).map(|_| policy.delay(attempt, &mut rng)).collect();
            for delay in &drawn {
                assert!((low..=high).contains(delay), "attempt {attempt}: {delay:?}");
            }
            if attempt < 9 {
                let spread = drawn.iter().max().unwrap().as_secs_f64()
                    - drawn.iter().min().unwrap().as_secs_f64();
                assert!(
                    spread > nominal * 0.3,
                    "attempt {attempt} barely varies: {spread}"
                );
            }
        }
    }

    #[test]
    fn jitter_never_pushes_a_delay_past_the_cap() {
        let policy = BackoffPolicy {
            jitter: 1.0,
            cap: ms(500),
            ..BackoffPolicy::default()
        };
        let mut rng = rng();

        let longest = (0..1000).map(|_| policy.delay(20, &mut rng)).max().unwrap();

        assert!(longest <= ms(500), "{longest:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let run = || {
            let mut tracker = RestartTracker::new(BackoffPolicy::default());
            delays(&crash_loop(&mut tracker, Instant::now(), ms(10), 8).0)
        };

        assert_eq!(run(), run());
    }

    #[test]
    fn the_attempt_count_resets_after_a_stable_period() {
        let policy = exact(BackoffPolicy {
            reset_after: ms(5000),
            ..BackoffPolicy::default()
        });
        let mut tracker = RestartTracker::new(policy);
        let (_, now) = crash_loop(&mut tracker, Instant::now(), ms(10), 3);
        assert_eq!(tracker.attempt(), 3);

        tracker.on_start(now);
        let decision = tracker.on_crash(now + ms(5000), &mut rng());

        assert_eq!(
            decision,
            Decision::Restart {
                attempt: 1,
                delay: ms(100)
            }
        );
    }

    #[test]
    fn a_run_shorter_than_the_stable_period_keeps_counting() {
        let policy = exact(BackoffPolicy {
            reset_after: ms(5000),
            ..BackoffPolicy::default()
        });
        let mut tracker = RestartTracker::new(policy);
        let (_, now) = crash_loop(&mut tracker, Instant::now(), ms(10), 3);

        tracker.on_start(now);
        let decision = tracker.on_crash(now + ms(4999), &mut rng());

        assert_eq!(
            decision,
            Decision::Restart {
                attempt: 4,
                delay: ms(800)
            }
        );
    }

    #[test]
    fn exhausting_the_budget_gives_up_with_the_typed_reason() {
        let budget = RestartBudget {
            max_restarts: 3,
            window: ms(60_000),
        };
        let mut tracker = RestartTracker::new(BackoffPolicy {
            budget,
            ..BackoffPolicy::default()
        });

        let (decisions, _) = crash_loop(&mut tracker, Instant::now(), ms(1), 4);

        assert_eq!(delays(&decisions).len(), 3);
        let expected = GiveUpReason::BudgetExhausted {
            restarts: 3,
            window: ms(60_000),
        };
        assert_eq!(decisions[3], Decision::GiveUp(expected.clone()));
        assert_eq!(tracker.gave_up(), Some(&expected));
        assert_eq!(
            expected.to_string(),
            "restart budget exhausted: 3 restarts within 60s"
        );
    }

    #[test]
    fn giving_up_is_final() {
        let budget = RestartBudget {
            max_restarts: 1,
            window: ms(1000),
        };
        let mut tracker = RestartTracker::new(BackoffPolicy {
            budget,
            ..BackoffPolicy::default()
        });
        let start = Instant::now();
        crash_loop(&mut tracker, start, Duration::ZERO, 2);

        let much_later = tracker.on_crash(start + ms(3_600_000), &mut rng());

        assert!(matches!(much_later, Decision::GiveUp(_)), "{much_later:?}");
    }

    #[test]
    fn restarts_older_than_the_window_no_longer_count_against_the_budget() {
        let budget = RestartBudget {
            max_restarts: 2,
            window: ms(10_000),
        };
        let policy = exact(BackoffPolicy {
            budget,
            ..BackoffPolicy::default()
        });
        let mut tracker = RestartTracker::new(policy);
        let start = Instant::now();
        let mut rng = rng();
        assert!(matches!(
            tracker.on_crash(start, &mut rng),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            tracker.on_crash(start + ms(1000), &mut rng),
            Decision::Restart { .. }
        ));

        let after_first_left = tracker.on_crash(start + ms(10_000), &mut rng);

        assert_eq!(
            after_first_left,
            Decision::Restart {
                attempt: 3,
                delay: ms(400)
            }
        );
    }

    #[test]
    fn a_stable_run_does_not_refill_the_budget() {
        let budget = RestartBudget {
            max_restarts: 2,
            window: ms(600_000),
        };
        let policy = BackoffPolicy {
            budget,
            reset_after: ms(1000),
            ..BackoffPolicy::default()
        };
        let mut tracker = RestartTracker::new(policy);

        let (decisions, _) = crash_loop(&mut tracker, Instant::now(), ms(2000), 3);

        assert!(matches!(decisions[2], Decision::GiveUp(_)), "{decisions:?}");
    }

    #[test]
    fn a_budget_of_zero_gives_up_on_the_first_crash() {
        let budget = RestartBudget {
            max_restarts: 0,
            window: ms(1000),
        };
        let mut tracker = RestartTracker::new(BackoffPolicy {
            budget,
            ..BackoffPolicy::default()
        });

        let decision = tracker.on_crash(Instant::now(), &mut rng());

        let expected = GiveUpReason::BudgetExhausted {
            restarts: 0,
            window: ms(1000),
        };
        assert_eq!(decision, Decision::GiveUp(expected));
    }

    #[test]
    fn a_huge_attempt_number_waits_the_cap_without_overflow() {
        let policy = BackoffPolicy::default();

        assert_eq!(policy.nominal_delay(u32::MAX), policy.cap);
        assert_eq!(policy.delay_bounds(u32::MAX).1, policy.cap);
    }

    #[test]
    fn validation_names_each_nonsensical_value() {
        let base = BackoffPolicy::default();
        let cases = [
            (
                BackoffPolicy {
                    base: ms(2000),
                    cap: ms(1000),
                    ..base.clone()
                },
                "exceeds the cap",
            ),
            (
                BackoffPolicy {
                    factor: 0.5,
                    ..base.clone()
                },
                "factor",
            ),
            (
                BackoffPolicy {
                    factor: f64::NAN,
                    ..base.clone()
                },
                "factor",
            ),
            (
                BackoffPolicy {
                    jitter: 1.5,
                    ..base.clone()
                },
                "jitter",
            ),
            (
                BackoffPolicy {
                    jitter: -0.1,
                    ..base.clone()
                },
                "jitter",
            ),
            (
                BackoffPolicy {
                    budget: RestartBudget {
                        max_restarts: 3,
                        window: Duration::ZERO,
                    },
                    ..base.clone()
                },
                "window",
            ),
        ];
        for (policy, needle) in cases {
            let err = policy.validate().unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "{err} should mention {needle}"
            );
        }
    }

    #[test]
    fn out_of_range_values_are_read_as_their_nearest_sensible_value() {
        let policy = BackoffPolicy {
            factor: 0.5,
            jitter: -3.0,
            ..BackoffPolicy::default()
        };
        let mut rng = rng();

        assert_eq!(policy.nominal_delay(5), ms(100));
        assert_eq!(policy.delay(5, &mut rng), ms(100));
    }
}
