//! What the source does when pre-copy does not converge on its own: auto-converge (throttle
//! the vCPUs, as QEMU's `auto-converge`), a downtime ramp (allow a little more downtime each
//! pass, up to a ceiling) and stall detection (end the migration when nothing brings the
//! switchover closer). Pure arithmetic over per-pass figures, so it is tested without a VM.

use std::time::{Duration, Instant};

/// How long a throttle measuring period lasts at least (QEMU evaluates once a second).
pub const THROTTLE_PERIOD: Duration = Duration::from_secs(1);

/// Below this expected downtime another pass is not worth it: the switchover's fixed cost
/// (device state, load, COMMIT round trip; 3-5 ms measured on loopback) dominates.
pub const SHRINK_FLOOR_MS: u64 = 2;

/// At most this many passes after the first one that fitted.
pub const MAX_SHRINK_PASSES: u32 = 4;

/// Convergence parameters, named as `migrate-set-parameters` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvergeParams {
    /// Capability `auto-converge`: throttle the vCPUs when passes do not shrink enough.
    pub auto_converge: bool,
    /// `cpu-throttle-initial`: the first throttle percentage (1..=99, default 20).
    pub throttle_initial: u8,
    /// `cpu-throttle-increment`: added each time the throttle rises (1..=99, default 10).
    pub throttle_increment: u8,
    /// `cpu-throttle-tailslow`: near the end, raise only as much as the dirty rate needs.
    pub throttle_tailslow: bool,
    /// `max-cpu-throttle`: the highest percentage (1..=99, default 99).
    pub max_throttle: u8,
    /// `throttle-trigger-threshold`: a period is "high" when it dirtied more than this
    /// percentage of what it sent (1..=100, default 50).
    pub trigger_threshold: u8,
    /// `__org.ferry_downtime-step`: ms added to the allowed downtime per pass after the first
    /// (0: no ramp).
    pub downtime_step_ms: u64,
    /// `__org.ferry_downtime-ceiling`: the ramp stops here (never below `downtime-limit`).
    pub downtime_ceiling_ms: u64,
    /// `__org.ferry_stall-passes`: passes without progress (the expected downtime coming 5 %
    /// closer to the allowed one than ever before) that make a stall (0: off).
    pub stall_passes: u32,
    /// `__org.ferry_stall-timeout`: time without progress that makes a stall (zero: off).
    pub stall_timeout: Duration,
}

impl Default for ConvergeParams {
    fn default() -> Self {
        ConvergeParams {
            auto_converge: false,
            throttle_initial: 20,
            throttle_increment: 10,
            throttle_tailslow: false,
            max_throttle: 99,
            trigger_threshold: 50,
            downtime_step_ms: 0,
            downtime_ceiling_ms: 0,
            stall_passes: 0,
            stall_timeout: Duration::ZERO,
        }
    }
}

/// Why pre-copy stalled, in figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall {
    /// Passes since the last progress.
    pub passes: u64,
    /// Time since the last progress.
    pub since: Duration,
    /// Downtime the last pass predicted.
    pub expected_ms: u64,
    /// Downtime allowed at that pass.
    pub allowed_ms: u64,
}

/// What the engine should do after a pass that did not fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Set the vCPU throttle to this percentage.
    pub throttle: Option<u8>,
    /// Pre-copy has stalled.
    pub stall: Option<Stall>,
}

/// Convergence state of one migration.
#[derive(Debug)]
pub struct Converge {
    p: ConvergeParams,
    throttle: u8,
    high_periods: u32,
    period_start: Instant,
    period_dirty: u64,
    period_sent: u64,
    /// Smallest gap between expected and allowed downtime so far (positive: a pass that
    /// fits never gets here), and when it was seen.
    best_gap: i64,
    best_pass: u64,
    best_at: Instant,
    /// Passes run after one already fitted.
    shrink_passes: u32,
}

impl Converge {
    /// Starts tracking at `now`.
    pub fn new(p: ConvergeParams, now: Instant) -> Converge {
        Converge {
            p,
            throttle: 0,
            high_periods: 0,
            period_start: now,
            period_dirty: 0,
            period_sent: 0,
            best_gap: i64::MAX,
            best_pass: 0,
            best_at: now,
            shrink_passes: 0,
        }
    }

    /// The current throttle percentage (0: none).
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Downtime allowed after dirty pass `pass` (1-based) with `limit_ms` the live
    /// `downtime-limit`: the limit, raised by the ramp up to its ceiling.
    pub fn allowed_ms(&self, limit_ms: u64, pass: u64) -> u64 {
        if self.p.downtime_step_ms == 0 {
            return limit_ms;
        }
        let ramped = limit_ms.saturating_add(
            self.p
                .downtime_step_ms
                .saturating_mul(pass.saturating_sub(1)),
        );
        ramped.min(self.p.downtime_ceiling_ms.max(limit_ms))
    }

    /// A pass that fits the allowed downtime: run one more instead of switching over? Yes
    /// while the pass dirtied at most half of the `sent` bytes it sent (so the next one is
    /// at most half as long and leaves less again), the switchover would still take more than
    /// [`SHRINK_FLOOR_MS`] and fewer than [`MAX_SHRINK_PASSES`] such passes ran. A guest
    /// writing steadily faster than that gets no extra pass; one that leaves less each pass
    /// pays for these passes with at most about twice the downtime they save.
    pub fn shrink_further(&mut self, sent: u64, dirty: u64, expected_ms: u64) -> bool {
        let worth = expected_ms > SHRINK_FLOOR_MS
            && dirty.saturating_mul(2) <= sent
            && self.shrink_passes < MAX_SHRINK_PASSES;
        if worth {
            self.shrink_passes += 1;
        }
        worth
    }

    /// After dirty pass `pass` (1-based) sent `sent` page bytes and the sync found `dirty`
    /// bytes dirty, with `expected_ms` predicted against `allowed_ms`: throttle or stall?
    pub fn after_pass(
        &mut self,
        pass: u64,
        sent: u64,
        dirty: u64,
        expected_ms: u64,
        allowed_ms: u64,
        now: Instant,
    ) -> Step {
        let mut step = Step::default();
        if self.p.auto_converge {
            self.period_sent += sent;
            self.period_dirty += dirty;
            if now.duration_since(self.period_start) >= THROTTLE_PERIOD {
                step.throttle = self.end_period();
                self.period_start = now;
                self.period_sent = 0;
                self.period_dirty = 0;
            }
        }
        if step.throttle.is_some() {
            // The guest just got slower: the stall clock starts again.
            self.best_gap = i64::MAX;
        }
        let gap = i64::try_from(expected_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(allowed_ms).unwrap_or(i64::MAX));
        // Progress: at least 5 % closer than ever before (noise in the bandwidth estimate
        // alone sets a new low now and then).
        if i128::from(gap) * 100 < i128::from(self.best_gap) * 95 {
            self.best_gap = gap;
            self.best_pass = pass;
            self.best_at = now;
            return step;
        }
        let passes = pass - self.best_pass;
        let since = now.duration_since(self.best_at);
        let by_passes = self.p.stall_passes > 0 && passes >= u64::from(self.p.stall_passes);
        let by_time = !self.p.stall_timeout.is_zero() && since >= self.p.stall_timeout;
        if by_passes || by_time {
            step.stall = Some(Stall {
                passes,
                since,
                expected_ms,
                allowed_ms,
            });
        }
        step
    }

    /// QEMU's rule: a period that dirtied more than the threshold share of what it sent is
    /// high; every second high period starts or raises the throttle.
    fn end_period(&mut self) -> Option<u8> {
        let threshold = self.period_sent as u128 * u128::from(self.p.trigger_threshold) / 100;
        if u128::from(self.period_dirty) <= threshold {
            return None;
        }
        self.high_periods += 1;
        if self.high_periods < 2 {
            return None;
        }
        self.high_periods = 0;
        let max = self.p.max_throttle.clamp(1, 99);
        let next = if self.throttle == 0 {
            self.p.throttle_initial
        } else {
            let inc = if self.p.throttle_tailslow {
                // The share of CPU that would bring the dirty rate down to the threshold.
                let now = f64::from(100 - self.throttle);
                let ideal = now * threshold as f64 / self.period_dirty as f64;
                ((now - ideal) as u8).min(self.p.throttle_increment)
            } else {
                self.p.throttle_increment
            };
            self.throttle.saturating_add(inc)
        };
        let next = next.clamp(1, max);
        if next == self.throttle {
            return None;
        }
        self.throttle = next;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn auto() -> ConvergeParams {
        ConvergeParams {
            auto_converge: true,
            ..ConvergeParams::default()
        }
    }

    /// One pass per second, each dirtying `dirty` of `sent` bytes; the throttle after each.
    fn run(p: ConvergeParams, passes: u64, sent: u64, dirty: u64) -> Vec<u8> {
        let t0 = Instant::now();
        let mut c = Converge::new(p, t0);
        (1..=passes)
            .map(|i| {
                c.after_pass(i, sent, dirty, 500, 100, t0 + THROTTLE_PERIOD * i as u32);
                c.throttle()
            })
            .collect()
    }

    #[test]
    fn a_fitting_pass_that_shrank_by_half_gets_another_until_the_floor() {
        let mut c = Converge::new(ConvergeParams::default(), Instant::now());
        // 2 GiB sent, 98 MiB dirtied meanwhile, 75 ms expected: one more pass.
        assert!(c.shrink_further(2048 * MIB, 98 * MIB, 75));
        assert!(c.shrink_further(98 * MIB, 7 * MIB, 6));
        // At the floor the switchover's fixed cost dominates.
        assert!(!c.shrink_further(7 * MIB, MIB, SHRINK_FLOOR_MS));
    }

    #[test]
    fn a_steady_writer_or_too_many_passes_switch_over() {
        let mut c = Converge::new(ConvergeParams::default(), Instant::now());
        // Dirtied more than half of what went out: the next pass would not be much shorter.
        assert!(!c.shrink_further(64 * MIB, 33 * MIB, 50));
        let runs = (0..10)
            .take_while(|_| c.shrink_further(64 * MIB, MIB, 50))
            .count();
        assert_eq!(runs, MAX_SHRINK_PASSES as usize);
    }

    #[test]
    fn every_second_high_period_raises_the_throttle_as_qemu_does() {
        let t = run(auto(), 8, 64 * MIB, 64 * MIB);
        assert_eq!(t, [0, 20, 20, 30, 30, 40, 40, 50]);
    }

    #[test]
    fn a_period_under_the_threshold_does_not_throttle() {
        assert_eq!(run(auto(), 6, 64 * MIB, 32 * MIB), [0; 6]);
    }

    #[test]
    fn the_throttle_stops_at_its_maximum() {
        let p = ConvergeParams {
            throttle_initial: 80,
            throttle_increment: 15,
            max_throttle: 90,
            ..auto()
        };
        assert_eq!(run(p, 6, MIB, MIB), [0, 80, 80, 90, 90, 90]);
    }

    #[test]
    fn tailslow_raises_only_as_much_as_the_dirty_rate_needs() {
        // 40 % throttle, dirtying 55 % of what is sent against a 50 % threshold: the ideal CPU
        // share is 60 * 50/55 = 54.5, so the throttle rises by 5, not 10.
        let p = ConvergeParams {
            throttle_initial: 40,
            throttle_tailslow: true,
            ..auto()
        };
        let t = run(p, 4, 100 * MIB, 55 * MIB);
        assert_eq!(t, [0, 40, 40, 45]);
    }

    #[test]
    fn periods_shorter_than_a_second_add_up() {
        let t0 = Instant::now();
        let mut c = Converge::new(auto(), t0);
        let ms = Duration::from_millis;
        // Ten passes of 250 ms: a period ends every fourth pass.
        let mut seen = Vec::new();
        for i in 1..=10u32 {
            let s = c.after_pass(u64::from(i), MIB, MIB, 500, 100, t0 + ms(250) * i);
            seen.push(s.throttle);
        }
        assert_eq!(seen.iter().flatten().collect::<Vec<_>>(), [&20]);
        assert_eq!(seen[7], Some(20));
    }

    #[test]
    fn the_ramp_raises_the_allowed_downtime_up_to_its_ceiling() {
        let p = ConvergeParams {
            downtime_step_ms: 50,
            downtime_ceiling_ms: 220,
            ..ConvergeParams::default()
        };
        let c = Converge::new(p, Instant::now());
        let allowed: Vec<u64> = (1..=6).map(|i| c.allowed_ms(100, i)).collect();
        assert_eq!(allowed, [100, 150, 200, 220, 220, 220]);
        // A ceiling under the limit never lowers it; no step, no ramp.
        assert_eq!(c.allowed_ms(300, 4), 300);
        let flat = Converge::new(ConvergeParams::default(), Instant::now());
        assert_eq!(flat.allowed_ms(100, 9), 100);
    }

    #[test]
    fn no_progress_for_n_passes_is_a_stall() {
        let p = ConvergeParams {
            stall_passes: 3,
            ..ConvergeParams::default()
        };
        let t0 = Instant::now();
        let mut c = Converge::new(p, t0);
        let at = |i: u64| t0 + Duration::from_millis(100 * i);
        // Expected downtimes: progress until pass 3, then none for three passes (651 ms is
        // a new low, but not 5 % closer than 650).
        let expected = [900, 700, 650, 660, 651, 800];
        let stalls: Vec<bool> = expected
            .iter()
            .zip(1u64..)
            .map(|(&e, i)| c.after_pass(i, MIB, MIB, e, 100, at(i)).stall.is_some())
            .collect();
        assert_eq!(stalls, [false, false, false, false, false, true]);
        let s = c.after_pass(7, MIB, MIB, 700, 100, at(7)).stall.unwrap();
        assert_eq!((s.passes, s.expected_ms, s.allowed_ms), (4, 700, 100));
    }

    #[test]
    fn no_progress_for_a_while_is_a_stall_and_a_ramp_is_progress() {
        let p = ConvergeParams {
            stall_timeout: Duration::from_secs(2),
            downtime_step_ms: 30,
            downtime_ceiling_ms: 190,
            ..ConvergeParams::default()
        };
        let t0 = Instant::now();
        let mut c = Converge::new(p, t0);
        let mut first = None;
        for i in 1..=10u64 {
            let allowed = c.allowed_ms(100, i);
            let s = c.after_pass(i, MIB, MIB, 500, allowed, t0 + Duration::from_secs(i));
            if s.stall.is_some() && first.is_none() {
                first = Some(i);
            }
        }
        // The ramp makes progress until pass 4 (190 ms); two seconds later it is a stall.
        assert_eq!(first, Some(6));
    }

    #[test]
    fn a_throttle_rise_restarts_the_stall_clock() {
        let p = ConvergeParams {
            stall_passes: 2,
            ..auto()
        };
        let t0 = Instant::now();
        let mut c = Converge::new(p, t0);
        let mut stalls = Vec::new();
        for i in 1..=4u64 {
            let s = c.after_pass(i, MIB, MIB, 500, 100, t0 + THROTTLE_PERIOD * i as u32);
            stalls.push((s.throttle, s.stall.is_some()));
        }
        assert_eq!(
            stalls,
            [
                (None, false),
                (Some(20), false),
                (None, false),
                (Some(30), false)
            ]
        );
    }
}
