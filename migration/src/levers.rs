//! Benchmark switches for the speed levers of issue 15, so each one's effect can be measured
//! on its own: `FERRY_LEVERS_OFF=prefault,known-zero` (read once per process) turns those off.
//! Every lever is on by default; the switch exists for `qemu_compare`'s ablation runs only.

use std::sync::OnceLock;

/// A speed lever that a benchmark can turn off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lever {
    /// Destination: populate guest RAM in the background from the moment it waits for a
    /// migration, so first touch leaves the critical path.
    Prefault,
    /// Source: pages the guest never touched are known to be zero without being read.
    KnownZero,
    /// Source: pages are checked and sent straight from guest memory (no copy first).
    DirectSend,
    /// Destination: DATA pages are read from the channel straight into guest memory.
    DirectReceive,
    /// Source: a pass that fits the downtime but leaves at most half of what it sent dirty
    /// is followed by another ([`crate::converge::Converge::shrink_further`]).
    ShrinkPasses,
    /// Destination: the RAM prefault pauses while a migration streams in. Even at nice 19 it
    /// holds a CPU for a whole huge page's first touch (the kernel does not preempt there),
    /// delaying the page channels, the switch-over and, over loopback, the source's vCPUs.
    PrefaultPause,
    /// vCPU threads ask the scheduler for a short slice (0.1 ms), so a runnable vCPU waits
    /// less long behind CPU-bound threads: shorter guest-visible stalls on a busy host.
    VcpuSlice,
}

impl Lever {
    /// Every lever, in the order the benchmark reports them.
    pub const ALL: [Lever; 7] = [
        Lever::Prefault,
        Lever::KnownZero,
        Lever::DirectSend,
        Lever::DirectReceive,
        Lever::ShrinkPasses,
        Lever::PrefaultPause,
        Lever::VcpuSlice,
    ];

    /// The name used in `FERRY_LEVERS_OFF`.
    pub fn name(self) -> &'static str {
        match self {
            Lever::Prefault => "prefault",
            Lever::KnownZero => "known-zero",
            Lever::DirectSend => "direct-send",
            Lever::DirectReceive => "direct-receive",
            Lever::ShrinkPasses => "shrink-passes",
            Lever::PrefaultPause => "prefault-pause",
            Lever::VcpuSlice => "vcpu-slice",
        }
    }

    /// Whether this lever is on (not named in `FERRY_LEVERS_OFF`).
    pub fn on(self) -> bool {
        static OFF: OnceLock<Vec<String>> = OnceLock::new();
        let off = OFF.get_or_init(|| {
            std::env::var("FERRY_LEVERS_OFF")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        });
        !off.iter().any(|s| s == self.name())
    }
}
