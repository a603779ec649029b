//! A SIGSTOPped leader of three real `lockd` processes on loopback, driven through
//! `lockd-client` and a raw protocol connection: a new leader replaces it, on SIGCONT it steps
//! down without stale answers to what it received while stopped, and its clients move on.
//!
//! The harness is `support::process`: multi-process tests run one at a time (DESIGN §3a.15),
//! every test takes `SERIAL` first; when a test fails, the tail of every node's log is printed
//! and the cluster's temp dir is kept; every wait polls a condition with a deadline.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lockd_client::{Client, ClientConfig};
use lockd_protocol::{
    ClientMessage, Consistency, Error as WireError, ReadOp, Reply, Request, ServerMessage, SetOp,
    WriteOp, WriteResult,
};
use support::process::{
    cluster_fast, ms, pinned_client, tolerated_during_failover, Cluster, SERIAL,
};

/// Waits for the answers to `ids` on a raw connection; each within `within`.
async fn raw_answers(
    raw: &mut support::Raw,
    ids: &[u64],
    within: Duration,
) -> BTreeMap<u64, (u64, Result<Reply, WireError>)> {
    let mut answers = BTreeMap::new();
    let deadline = Instant::now() + within;
    while answers.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, raw.recv())
            .await
            .unwrap_or_else(|_| panic!("no answer to {ids:?} within {within:?}; got {answers:?}"));
        match frame {
            Some(ServerMessage::Response {
                request_id,
                revision,
                result,
            }) if ids.contains(&request_id) => {
                answers.insert(request_id, (revision, result));
            }
            Some(_) => {}
            None => panic!("connection closed before answering {ids:?}; got {answers:?}"),
        }
    }
    answers
}

/// SIGSTOP of the leader: a fresh client writes through a new leader within a bounded time.
/// On SIGCONT the old leader steps down (it reports the new leader and term), a linearizable
/// read through it returns the latest data, and the requests it received while stopped are
/// answered with an error or with the applied result, never with stale state; a write among
/// them applies at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_leader_is_replaced_and_steps_down_without_stale_answers() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let cluster = Cluster::start(3, 3, cluster_fast()).await;
    let (old_leader, old_term) = cluster.leader().await;
    let setup = Client::connect(cluster.endpoints_from(old_leader))
        .await
        .expect("connect");
    setup.create("/s5", Vec::new()).await.expect("create /s5");
    setup
        .create("/s5/latest", b"v1".to_vec())
        .await
        .expect("create /s5/latest");
    setup
        .create("/s5/counter", b"c0".to_vec())
        .await
        .expect("create /s5/counter");
    let mut raw = support::Raw::connect(cluster.addr(old_leader).parse().expect("addr")).await;

    let stopped_at = Instant::now();
    cluster.signal(old_leader, "STOP");
    // Requests that reach the stopped leader's socket: a write and a linearizable read.
    const WRITE_ID: u64 = 1_001;
    const READ_ID: u64 = 1_002;
    raw.send(ClientMessage::Request {
        request_id: WRITE_ID,
        request: Request::Write {
            session: None,
            op: WriteOp::Set(SetOp {
                path: "/s5/counter".into(),
                data: b"while stopped".to_vec(),
                expected_version: None,
            }),
        },
    })
    .await;
    raw.send(ClientMessage::Request {
        request_id: READ_ID,
        request: Request::Read {
            consistency: Consistency::Linearizable,
            op: ReadOp::Get {
                path: "/s5/latest".into(),
            },
        },
    })
    .await;

    // A new client (the stopped node listed last) gets a write through within a bound.
    let others: Vec<u64> = (1..=3).filter(|&i| i != old_leader).collect();
    let mut endpoints: Vec<String> = others.iter().map(|&i| cluster.addr(i)).collect();
    endpoints.push(cluster.addr(old_leader));
    let fresh =
        Client::with_config(ClientConfig::new(endpoints).request_timeout(Duration::from_secs(3)))
            .await
            .expect("connect a fresh client");
    let deadline = stopped_at + Duration::from_secs(10);
    let mut failures = Vec::new();
    let written = loop {
        match fresh.set("/s5/latest", b"v2".to_vec()).await {
            Ok(set) => break set,
            Err(e) => {
                assert!(tolerated_during_failover(&e), "write v2: {e}");
                failures.push(e.to_string());
                assert!(
                    Instant::now() < deadline,
                    "no write through a new leader within 10 s of SIGSTOP: {failures:?}"
                );
            }
        }
    };
    let moved_on = stopped_at.elapsed();
    let (new_leader, new_term) = cluster
        .agreed_leader(&others, Duration::from_secs(10))
        .await;
    assert!(new_term > old_term);

    let continued_at = Instant::now();
    cluster.signal(old_leader, "CONT");
    let answers = raw_answers(&mut raw, &[WRITE_ID, READ_ID], Duration::from_secs(10)).await;

    // The old leader steps down: it reports the new leader and term.
    let deadline = continued_at + Duration::from_secs(10);
    let stepped_down = loop {
        let status = cluster.status(old_leader).await;
        if let Some(s) = &status {
            if s.leader == Some(new_leader) && s.term == new_term {
                break continued_at.elapsed();
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {old_leader} did not step down within 10 s of SIGCONT: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (leader, term) = cluster.leader().await;
    assert_eq!((leader, term), (new_leader, new_term));

    // A linearizable read through the old leader sees the latest write, and the next one.
    let through_old = pinned_client(&cluster.addr(old_leader)).await;
    let got = through_old
        .get("/s5/latest")
        .await
        .expect("read via old leader");
    assert_eq!(got.data, b"v2", "linearizable read through the old leader");
    assert!(got.revision >= written.revision);
    let v3 = fresh
        .set("/s5/latest", b"v3".to_vec())
        .await
        .expect("write v3");
    let got = through_old
        .get("/s5/latest")
        .await
        .expect("read via old leader");
    assert_eq!(got.data, b"v3", "read-after-write through the old leader");
    assert!(got.revision >= v3.revision);

    // What the stopped leader answered.
    let (read_revision, read_answer) = &answers[&READ_ID];
    match read_answer {
        Ok(Reply::Node { data, .. }) => assert_eq!(
            data, b"v2",
            "a linearizable read received while stopped and answered after SIGCONT \
             (revision {read_revision}) must not return stale data"
        ),
        Ok(other) => panic!("read answered {other:?}"),
        Err(e) => assert!(e.is_retryable(), "read answered with {e}"),
    }
    let (write_revision, write_answer) = &answers[&WRITE_ID];
    let mut counter = None;
    for id in 1..=3 {
        let got = pinned_client(&cluster.addr(id))
            .await
            .get("/s5/counter")
            .await
            .expect("read /s5/counter");
        if let Some(c) = &counter {
            assert_eq!(&got.data, c, "/s5/counter differs on node {id}");
        }
        counter = Some(got.data.clone());
        match write_answer {
            Ok(Reply::Write(WriteResult::Set { stat })) => {
                assert_eq!(stat.version, 1, "the write applied once");
                assert_eq!(stat.mod_rev, *write_revision);
                assert_eq!(
                    (got.data.as_slice(), got.stat.version, got.stat.mod_rev),
                    (&b"while stopped"[..], 1, *write_revision),
                    "the acknowledged write is there, once, on node {id}"
                );
            }
            Ok(other) => panic!("write answered {other:?}"),
            Err(WireError::Indeterminate(_)) => assert!(
                got.stat.version <= 1,
                "an indeterminate write applied at most once: {got:?}"
            ),
            Err(e) => {
                assert!(e.is_retryable(), "write answered with {e}");
                assert_eq!(
                    (got.data.as_slice(), got.stat.version),
                    (&b"c0"[..], 0),
                    "a write answered {e} did not apply (node {id})"
                );
            }
        }
    }
    println!(
        "SIGSTOP of leader {old_leader} (term {old_term}): a fresh client wrote after {:.0} ms \
         (failures before: {failures:?}); node {new_leader} leads term {new_term}; after SIGCONT \
         the old leader reported the new leader after {:.0} ms; while stopped it was sent a \
         write, answered {write_answer:?}, and a linearizable read, answered {read_answer:?}; \
         test took {:.1} s",
        ms(moved_on),
        ms(stepped_down),
        started.elapsed().as_secs_f64()
    );
}

/// A client connected to the leader when it is SIGSTOPped (its TCP connection stays up) moves
/// on to the new leader within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_of_a_stopped_leader_moves_on_to_the_new_leader() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3, 3, cluster_fast()).await;
    let (old_leader, _) = cluster.leader().await;
    let client = Client::with_config(
        ClientConfig::new(cluster.endpoints_from(old_leader))
            .request_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("connect");
    client.create("/s6", Vec::new()).await.expect("create /s6");
    assert_eq!(client.connected_to(), Some(cluster.addr(old_leader)));

    let stopped_at = Instant::now();
    cluster.signal(old_leader, "STOP");
    let deadline = stopped_at + Duration::from_secs(10);
    let mut failures = Vec::new();
    for i in 0u64.. {
        match client.create(format!("/s6/n{i}"), Vec::new()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(tolerated_during_failover(&e), "write: {e}");
                failures.push(format!("{:.0} ms: {e}", ms(stopped_at.elapsed())));
                assert!(
                    Instant::now() < deadline,
                    "a client connected to the stopped leader did not get a write through \
                     within 10 s (still on {:?}): {failures:?}",
                    client.connected_to()
                );
            }
        }
    }
    println!(
        "client of a SIGSTOPped leader: wrote through {:?} after {:.0} ms; failures: {failures:?}",
        client.connected_to(),
        ms(stopped_at.elapsed())
    );
    cluster.signal(old_leader, "CONT");
}
