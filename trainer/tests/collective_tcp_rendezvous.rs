//! Forming the TCP ring with strangers on the host: connections that stay silent, send garbage
//! or cannot prove they hold the job token are dropped while the gang forms, and ranks with
//! different tokens refuse each other. Real sockets on 127.0.0.1; every test has a deadline.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{input, within};
use rtrain_trainer::collective::{CollectiveError, ReduceOp, TcpCollective, TcpRendezvousPoint};

const CONNECT: Duration = Duration::from_secs(10);
const TOKEN: &str = "collective-test-token";

fn bind(world: usize) -> (Vec<TcpRendezvousPoint>, Vec<String>) {
    let points: Vec<_> = (0..world).map(|_| TcpCollective::bind("127.0.0.1").unwrap()).collect();
    let peers = points.iter().map(|p| p.addr().to_string()).collect();
    (points, peers)
}

/// Connects every rank with `TOKEN`, all-reduces `input(rank, i)` and returns each rank's sums.
fn form_and_reduce(points: Vec<TcpRendezvousPoint>, peers: Vec<String>) -> Vec<Vec<f32>> {
    let joins: Vec<_> = points
        .into_iter()
        .enumerate()
        .map(|(rank, point)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                let mut comm = point.connect(rank, &peers, TOKEN, CONNECT).unwrap();
                let mut data: Vec<f32> = (0..1000).map(|i| input(rank, i)).collect();
                comm.all_reduce_f32(&mut data, ReduceOp::Sum).unwrap();
                data
            })
        })
        .collect();
    joins.into_iter().map(|j| j.join().unwrap()).collect()
}

/// Every rank holds the direct sum over ranks (exact: the inputs are multiples of 1/64).
fn check_sums(results: &[Vec<f32>]) {
    let world = results.len();
    for (rank, data) in results.iter().enumerate() {
        for (i, got) in data.iter().enumerate() {
            let want: f32 = (0..world).map(|r| input(r, i)).sum();
            assert_eq!(*got, want, "rank {rank} element {i}");
        }
    }
}

#[test]
fn a_silent_connection_does_not_stall_the_gang() {
    // Before the handshake was concurrent, each rank waited for the silent client's hello until
    // the connect timeout and the gang never formed.
    within(Duration::from_secs(30), || {
        let (points, peers) = bind(3);
        let silent: Vec<TcpStream> = peers.iter().map(|p| TcpStream::connect(p).unwrap()).collect();
        check_sums(&form_and_reduce(points, peers));
        drop(silent);
    });
}

#[test]
fn garbage_and_unauthenticated_hellos_are_dropped_and_the_gang_forms() {
    within(Duration::from_secs(30), || {
        let (points, peers) = bind(2);
        let mut garbage = TcpStream::connect(&peers[1]).unwrap();
        garbage.write_all(&[0xAB; 200]).unwrap();
        // An impostor that speaks the protocol as rank 0 but holds another token.
        let impostor = TcpCollective::bind("127.0.0.1").unwrap();
        let impostor_peers = vec![impostor.addr().to_string(), peers[1].clone()];
        let impostor = std::thread::spawn(move || impostor.connect(0, &impostor_peers, "a guess", CONNECT));
        std::thread::sleep(Duration::from_millis(50));
        check_sums(&form_and_reduce(points, peers));
        let err = impostor.join().unwrap().unwrap_err();
        assert!(matches!(err, CollectiveError::Unauthenticated { peer: 1, .. }), "{err}");
        drop(garbage);
    });
}

#[test]
fn ranks_with_different_tokens_refuse_each_other() {
    within(Duration::from_secs(30), || {
        let (points, peers) = bind(2);
        let joins: Vec<_> = points
            .into_iter()
            .enumerate()
            .map(|(rank, point)| {
                let peers = peers.clone();
                std::thread::spawn(move || point.connect(rank, &peers, &format!("token-{rank}"), CONNECT))
            })
            .collect();
        for (rank, join) in joins.into_iter().enumerate() {
            let err = join.join().unwrap().unwrap_err();
            assert!(matches!(err, CollectiveError::Unauthenticated { .. }), "rank {rank}: {err}");
            assert!(err.to_string().contains("RTRAIN_JOB_TOKEN"), "rank {rank}: {err}");
        }
    });
}

#[test]
fn an_empty_token_is_refused() {
    within(Duration::from_secs(10), || {
        let (mut points, peers) = bind(2);
        let err = points.remove(0).connect(0, &peers, "", CONNECT).unwrap_err();
        assert!(err.to_string().contains("token is empty"), "{err}");
    });
}
