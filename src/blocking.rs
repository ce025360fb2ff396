//! File I/O off the async runtime. A read or write that a stalled disk can block for good
//! (key and token files, the audit directory's probe) runs on a blocking thread, and the
//! async caller waits for it a bounded time: the disk's outage then costs that caller a
//! timeout, never a worker thread that sessions run on.
use std::sync::Arc;
use std::time::Duration;

/// Why a call run off the runtime gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Unanswered {
    /// Still running (it is left to finish on its thread).
    #[error("no answer within {0:?} (is the disk stalled?)")]
    TimedOut(Duration),
    /// It panicked or the runtime is shutting down.
    #[error("the call stopped: {0}")]
    Stopped(#[from] tokio::task::JoinError),
    /// Not started: the lane's previous call is still running (see [`OneAtATime`]).
    #[error("an earlier call is still waiting for an answer (is the disk stalled?)")]
    StillBusy,
}

/// Runs `call` on a blocking thread and waits for its answer at most `within`.
pub async fn within<T: Send + 'static>(
    within: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Unanswered> {
    match tokio::time::timeout(within, tokio::task::spawn_blocking(call)).await {
        Ok(joined) => Ok(joined?),
        Err(_) => Err(Unanswered::TimedOut(within)),
    }
}

/// Runs `work` — CPU-bound and long (the analysis of a statement of megabytes) — on this
/// worker thread after handing the worker's other tasks to the runtime, so no session queued
/// behind it waits for it. Inline where the runtime cannot hand over (a current-thread one).
pub fn hand_over_worker<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// A lane for calls that repeat (a refresh, a poll, a probe): at most one runs at a time.
/// A call that outlasts its bound keeps its turn until it really ends, so while the disk stays
/// stalled every later call is refused at once ([`Unanswered::StillBusy`]) instead of leaving
/// one more blocked thread behind the first each time it comes round.
#[derive(Debug, Clone)]
pub struct OneAtATime {
    turn: Arc<tokio::sync::Semaphore>,
}

impl Default for OneAtATime {
    fn default() -> Self {
        Self {
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

impl OneAtATime {
    /// [`within`], unless the lane's previous call is still running.
    pub async fn within<T: Send + 'static>(
        &self,
        bound: Duration,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Unanswered> {
        let Ok(turn) = self.turn.clone().try_acquire_owned() else {
            return Err(Unanswered::StillBusy);
        };
        within(bound, move || {
            let _turn = turn;
            call()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_that_outlasts_its_bound_is_reported_and_left_running() {
        let answered = within(Duration::from_secs(5), || 7).await;
        assert_eq!(answered.unwrap(), 7);
        let started = std::time::Instant::now();
        let slow = within(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500));
        })
        .await;
        assert!(matches!(slow, Err(Unanswered::TimedOut(_))), "{slow:?}");
        assert!(started.elapsed() < Duration::from_millis(400));
    }

    #[tokio::test]
    async fn a_lane_refuses_a_call_while_its_previous_one_still_runs() {
        let lane = OneAtATime::default();
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let first = lane
            .within(Duration::from_millis(50), move || {
                let _ = blocked.recv_timeout(Duration::from_secs(10));
            })
            .await;
        assert!(matches!(first, Err(Unanswered::TimedOut(_))), "{first:?}");
        // The first call outlasted its bound but still runs: the next is not started.
        let second = lane.within(Duration::from_secs(5), || 2).await;
        assert!(matches!(second, Err(Unanswered::StillBusy)), "{second:?}");
        drop(release);
        // Once it has ended, the lane runs calls again.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match lane.within(Duration::from_secs(5), || 3).await {
                Ok(answer) => break assert_eq!(answer, 3),
                Err(Unanswered::StillBusy) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}
