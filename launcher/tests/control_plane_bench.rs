//! The control-plane benchmark run small: every simulated rank gets the whole peer list and every
//! heartbeat is accepted. No timing is asserted; `rtrain bench control-plane` reports it.

use std::time::Duration;

use rtrain_launcher::bench::{ControlPlaneOptions, control_plane};

#[test]
fn simulated_ranks_rendezvous_and_heartbeat() {
    let opts = ControlPlaneOptions { ranks: 32, window: Duration::from_secs(2), connections: 4 };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(control_plane(&opts));
    });
    let report = rx.recv_timeout(Duration::from_secs(120)).expect("the benchmark finishes").expect("it runs");

    assert_eq!(report.connections, 4);
    assert_eq!(report.register_errors, 0, "{:?}", report.first_error);
    assert_eq!(report.peer_lists_complete, 32, "every reply holds the 32 addresses in rank order");
    assert_eq!(report.heartbeats_refused, 0, "{:?}", report.first_error);
    assert_eq!(report.ranks_heartbeating, 32, "the coordinator holds a recent heartbeat of every rank");
    // The 2 s window starts half a period after the rendezvous: at least one round of 32.
    assert!(report.heartbeats_accepted >= 32, "{} heartbeats", report.heartbeats_accepted);
    assert!(report.correct());
    assert!(report.gang_complete_s.is_some(), "the driver heard the gang complete");
}
