use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

fn backoff() -> Backoff {
    Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_millis(400),
        healthy_after: Duration::from_secs(60),
    }
}

fn status(board: &Board) -> SourceStatus {
    let mut all = board.snapshot();
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

#[tokio::test(start_paused = true)]
async fn a_watcher_that_panics_is_started_again_and_its_last_snapshot_stays() {
    let board = Board::default();
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let mut watch = Watch::start(board.register("docker"), backoff(), move |tx, report| {
        let run = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            report.connected(None);
            tx.send_replace(Some(run));
            if run == 0 {
                panic!("lost the plot");
            }
            std::future::pending::<()>().await;
        }
    });
    watch.changed().await;
    assert_eq!(*watch.rx.borrow(), Some(0));

    // Inside the backoff: the supervisor saw the panic; the snapshot is still the last one.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let s = status(&board);
    assert_eq!(s.state, SourceState::Restarting);
    assert_eq!(s.restarts, 1);
    let error = s.last_error.unwrap_or_default();
    assert!(error.contains("panicked: lost the plot"), "{error}");
    assert_eq!(*watch.rx.borrow(), Some(0), "fail static");

    // After it: running again, publishing, and connected.
    tokio::time::timeout(Duration::from_secs(1), watch.changed())
        .await
        .expect("the watcher was started again");
    assert_eq!(*watch.rx.borrow(), Some(1));
    let s = status(&board);
    assert_eq!((s.state, s.restarts), (SourceState::Connected, 1));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_watcher_that_keeps_ending_is_started_again_with_growing_backoff() {
    let board = Board::default();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let recorded = starts.clone();
    let t0 = Instant::now();
    let _watch: Watch<()> = Watch::start(board.register("swarm"), backoff(), move |_, _| {
        recorded.lock().unwrap().push(t0.elapsed());
        async {}
    });
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let starts = starts.lock().unwrap().clone();
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    // 100, 200, 400, then capped at 400.
    assert_eq!(gaps[..4], [100, 200, 400, 400], "{starts:?}");
    let s = status(&board);
    assert_eq!(s.restarts as usize, starts.len());
    assert_eq!(s.last_error.as_deref(), Some("the watcher ended"));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_watch_stops_its_watcher() {
    struct Flag(Arc<AtomicU32>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicU32::new(0));
    let flag = dropped.clone();
    let watch: Watch<()> = Watch::start(
        Board::default().register("docker"),
        backoff(),
        move |_, _| {
            let guard = Flag(flag.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            }
        },
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(dropped.load(Ordering::SeqCst), 0);
    drop(watch);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the watcher task ended");
}

#[test]
fn a_source_registered_again_starts_fresh_and_the_old_handle_writes_nowhere() {
    let board = Board::default();
    let old = board.register("docker");
    old.unreachable("gone".into());
    let new = board.register("docker");
    old.unreachable("stale".into());
    new.connected(None);
    let s = status(&board);
    assert_eq!((s.state, s.last_error), (SourceState::Connected, None));
    board.remove("docker");
    assert!(board.snapshot().is_empty());
}
