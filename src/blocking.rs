//! File I/O off the async runtime. A read or write that a stalled disk can block for good
//! (key and token files, the audit directory's probe) runs on a blocking thread, and the
//! async caller waits for it a bounded time: the disk's outage then costs that caller a
//! timeout, never a worker thread that sessions run on.
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
}
