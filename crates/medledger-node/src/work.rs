//! The CPU time a node spends on each kind of its transaction work, so that a benchmark can
//! say where the time goes. Each measure is the CPU time of the thread that did the work,
//! not the wall-clock time: a thread waiting for a core, a lock or the disk adds nothing.
//! Measures are taken per batch (a block, a flush, a chunk of signatures), never per key,
//! so they cost a few system calls per block.

use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of work measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Checking transaction signatures, wherever the node does it.
    Verify,
    /// Executing blocks through the core.
    Execute,
    /// Putting executed blocks where reads see them (`Store::stage`).
    Stage,
    /// Writing staged blocks and state into the ledger file (`Store::flush`).
    Flush,
}

/// CPU time spent so far on each kind of work, in nanoseconds.
#[derive(Debug, Default)]
pub struct WorkTimes {
    verify: AtomicU64,
    execute: AtomicU64,
    stage: AtomicU64,
    flush: AtomicU64,
}

/// A reading of `WorkTimes`, in nanoseconds of CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkSpent {
    pub verify_ns: u64,
    pub execute_ns: u64,
    pub stage_ns: u64,
    pub flush_ns: u64,
}

impl WorkTimes {
    /// Runs `f` on this thread and adds the CPU time it took to `work`.
    pub fn measure<T>(&self, work: Work, f: impl FnOnce() -> T) -> T {
        let start = thread_cpu_ns();
        let out = f();
        let spent = thread_cpu_ns().saturating_sub(start);
        self.counter(work).fetch_add(spent, Ordering::Relaxed);
        out
    }

    pub fn spent(&self) -> WorkSpent {
        WorkSpent {
            verify_ns: self.verify.load(Ordering::Relaxed),
            execute_ns: self.execute.load(Ordering::Relaxed),
            stage_ns: self.stage.load(Ordering::Relaxed),
            flush_ns: self.flush.load(Ordering::Relaxed),
        }
    }

    fn counter(&self, work: Work) -> &AtomicU64 {
        match work {
            Work::Verify => &self.verify,
            Work::Execute => &self.execute,
            Work::Stage => &self.stage,
            Work::Flush => &self.flush,
        }
    }
}

impl WorkSpent {
    /// What was spent between `earlier` and `self`, both readings of the same counters.
    pub fn since(&self, earlier: &WorkSpent) -> WorkSpent {
        WorkSpent {
            verify_ns: self.verify_ns.saturating_sub(earlier.verify_ns),
            execute_ns: self.execute_ns.saturating_sub(earlier.execute_ns),
            stage_ns: self.stage_ns.saturating_sub(earlier.stage_ns),
            flush_ns: self.flush_ns.saturating_sub(earlier.flush_ns),
        }
    }

    /// All the work measured, in nanoseconds.
    pub fn total_ns(&self) -> u64 {
        self.verify_ns + self.execute_ns + self.stage_ns + self.flush_ns
    }

    /// The sum of two readings (of different nodes, say).
    pub fn plus(&self, other: &WorkSpent) -> WorkSpent {
        WorkSpent {
            verify_ns: self.verify_ns + other.verify_ns,
            execute_ns: self.execute_ns + other.execute_ns,
            stage_ns: self.stage_ns + other.stage_ns,
            flush_ns: self.flush_ns + other.flush_ns,
        }
    }
}

/// The CPU clocks read: the calling thread's, or the whole process's.
#[derive(Clone, Copy)]
enum CpuClock {
    Thread,
    Process,
}

/// Nanoseconds of CPU time on `clock`; 0 where it cannot be read (and off Linux, where the
/// node does not link libc), so every measure there is 0.
fn cpu_clock_ns(clock: CpuClock) -> u64 {
    #[cfg(target_os = "linux")]
    {
        let id = match clock {
            CpuClock::Thread => libc::CLOCK_THREAD_CPUTIME_ID,
            CpuClock::Process => libc::CLOCK_PROCESS_CPUTIME_ID,
        };
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid, writable timespec; the call writes only to it.
        if unsafe { libc::clock_gettime(id, &mut now) } == 0 {
            return (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = clock;
    0
}

/// CPU time the calling thread has used, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    cpu_clock_ns(CpuClock::Thread)
}

/// CPU time the whole process has used, every thread of it, in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    cpu_clock_ns(CpuClock::Process)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn work_is_counted_under_its_kind_in_cpu_time_only() {
        // Proves that a measure adds the thread's CPU time to its own kind alone, that a
        // sleep (no CPU) adds next to nothing, and that readings subtract and add.
        let times = WorkTimes::default();
        let busy = times.measure(Work::Verify, || {
            let start = thread_cpu_ns();
            let mut x = 0u64;
            while thread_cpu_ns() - start < 5_000_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            x
        });
        assert!(busy > 0);
        times.measure(Work::Flush, || {
            std::thread::sleep(std::time::Duration::from_millis(50))
        });
        let first = times.spent();
        assert!(first.verify_ns >= 5_000_000, "{first:?}");
        assert_eq!((first.execute_ns, first.stage_ns), (0, 0));
        assert!(
            first.flush_ns < 5_000_000,
            "a sleep is not CPU time: {first:?}"
        );
        times.measure(Work::Stage, || {
            let start = thread_cpu_ns();
            while thread_cpu_ns() - start < 1_000_000 {}
        });
        let second = times.spent();
        let between = second.since(&first);
        assert_eq!((between.verify_ns, between.flush_ns), (0, 0));
        assert!(between.stage_ns >= 1_000_000);
        assert_eq!(first.plus(&between), second);
        assert_eq!(
            second.total_ns(),
            second.verify_ns + second.execute_ns + second.stage_ns + second.flush_ns
        );
        assert!(process_cpu_ns() >= second.verify_ns + second.stage_ns);
    }
}
