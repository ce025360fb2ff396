//! The log's lock, which knows since when its holder has held it.
//!
//! Sessions write their records on their tokio worker under this lock, and a write to the
//! page cache takes microseconds — unless the audit disk stalls: then `write(2)` can block
//! (dirty-page throttling, a journal waiting on the device) with the lock held, and every
//! worker that queued behind it would block too, taking the whole proxy down with the disk.
//! So a worker waits for the lock only while its holder is making progress; once the holder
//! has held it for [`STALLED_AFTER`], the caller is told so and commits off the runtime,
//! within the `durability_timeout` it is owed. The one worker stuck in the write is the price
//! of a stalled disk; the proxy goes on answering (statements refused or run unaudited as
//! `on_failure` says, health checks, metrics).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Writer;
use crate::audit::handle::{Claim, InlineCommit, InlineLog, Pending};

/// How long a holder may keep the lock before its waiters stop blocking their worker for it.
/// A write of a batch takes microseconds; a rotation's fsync under the lock, a millisecond or
/// so on a slow disk. Beyond this, waiting is the disk's outage, not contention.
const STALLED_AFTER: Duration = Duration::from_millis(2);

/// How long a worker parks on the lock before it looks again at how long it has been held.
const RECHECK: Duration = Duration::from_micros(250);

/// The writer behind its lock.
pub(super) struct LogLock {
    writer: parking_lot::Mutex<Writer>,
    /// When the current holder took the lock: microseconds since `epoch`, plus one (zero
    /// while nobody holds it).
    held_since: AtomicU64,
    epoch: Instant,
    /// Tests: the next holder of the lock keeps it this long (µs), as a write to a stalled
    /// disk would.
    #[cfg(test)]
    stall_next: AtomicU64,
    /// Tests: threads waiting for the lock off the runtime now, and the most there were.
    #[cfg(test)]
    claim_waiters: (
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    ),
}

/// The writer, locked; records its holder's start while it lives.
pub(super) struct Held<'a> {
    guard: parking_lot::MutexGuard<'a, Writer>,
    lock: &'a LogLock,
}

impl std::ops::Deref for Held<'_> {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.guard
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Writer {
        &mut self.guard
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Before the guard's own drop releases the lock.
        self.lock.held_since.store(0, Ordering::Release);
    }
}

impl LogLock {
    pub(super) fn new(writer: Writer) -> Self {
        LogLock {
            writer: parking_lot::Mutex::new(writer),
            held_since: AtomicU64::new(0),
            epoch: Instant::now(),
            #[cfg(test)]
            stall_next: AtomicU64::new(0),
            #[cfg(test)]
            claim_waiters: Default::default(),
        }
    }

    /// Waits for the lock however long it takes: for the writer thread, which nothing else
    /// runs on.
    pub(super) fn lock(&self) -> Held<'_> {
        self.held(self.writer.lock())
    }

    /// Waits for the lock as long as its holder is not stalled; `None` once it has held the
    /// lock for [`STALLED_AFTER`].
    fn lock_unless_stalled(&self) -> Option<Held<'_>> {
        loop {
            if let Some(guard) = self.writer.try_lock_for(RECHECK) {
                return Some(self.held(guard));
            }
            if self.held_for() >= STALLED_AFTER {
                return None;
            }
        }
    }

    fn held<'a>(&'a self, guard: parking_lot::MutexGuard<'a, Writer>) -> Held<'a> {
        let since = self.epoch.elapsed().as_micros() as u64 + 1;
        self.held_since.store(since, Ordering::Release);
        let held = Held { guard, lock: self };
        #[cfg(test)]
        {
            let stall = self.stall_next.swap(0, Ordering::AcqRel);
            std::thread::sleep(Duration::from_micros(stall));
        }
        held
    }

    /// How long the current holder has held the lock (zero when free or just taken).
    fn held_for(&self) -> Duration {
        match self.held_since.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            since => self
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_micros(since - 1)),
        }
    }
}

impl InlineLog for LogLock {
    fn commit_unless_stalled(&self, batch: &mut Vec<Pending>) -> Option<InlineCommit> {
        Some(self.lock_unless_stalled()?.commit_inline(batch))
    }

    fn commit_claimed(
        &self,
        batch: &mut Vec<Pending>,
        claim: &Claim,
        within: Duration,
    ) -> Option<InlineCommit> {
        #[cfg(test)]
        let _waiting = self.count_claim_waiter();
        let mut writer = self.held(self.writer.try_lock_for(within)?);
        claim.take().then(|| writer.commit_inline(batch))
    }

    #[cfg(test)]
    fn delay_syncs(&self, by: Duration) {
        self.lock().test_sync_delay = by;
    }

    #[cfg(test)]
    fn is_locked(&self) -> bool {
        self.writer.is_locked()
    }

    #[cfg(test)]
    fn stall_next_holder(&self, by: Duration) {
        self.stall_next
            .store(by.as_micros() as u64, Ordering::Release);
    }

    #[cfg(test)]
    fn most_claim_waiters(&self) -> usize {
        self.claim_waiters.1.load(Ordering::Acquire)
    }
}

#[cfg(test)]
impl LogLock {
    /// Counts a thread waiting for the lock off the runtime until the guard drops.
    fn count_claim_waiter(&self) -> impl Drop + '_ {
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let (now, most) = &self.claim_waiters;
        most.fetch_max(now.fetch_add(1, Ordering::AcqRel) + 1, Ordering::AcqRel);
        Waiting(now)
    }
}
