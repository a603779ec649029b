//! Tests of the frame codec and the wire format.
//!
//! * round trips of arbitrary `ClientMessage`s and `ServerMessage`s, one at a time and as a
//!   stream of frames cut at random points;
//! * the decoder never panics on arbitrary or corrupted input and never allocates for a
//!   length prefix above the limit;
//! * the frame limit is exact on decode and on encode;
//! * unknown tags, trailing bytes and other malformed payloads are `Malformed`;
//! * the exact bytes of a few small frames (these pin the wire format: if one of them changes,
//!   the protocol changed and `PROTOCOL_VERSION` and docs/protocol.md must say so).

use bytes::{BufMut, BytesMut};
use lockd_protocol::codec::{encode_frame, from_bytes, to_bytes};
use lockd_protocol::*;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

// ------------------------------------------------------------------------------------------
// Strategies
// ------------------------------------------------------------------------------------------

/// Small values (one-byte varints and the 250/251 boundary) as often as arbitrary ones.
fn num() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..300,
        Just(u64::from(u16::MAX)),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn num32() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..300, Just(u32::MAX), any::<u32>()]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "/[a-z0-9/._-]{0,16}",
        any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..40)
}

fn session_id() -> impl Strategy<Value = SessionId> {
    num().prop_map(SessionId)
}

fn stat() -> BoxedStrategy<Stat> {
    (
        (num(), num(), num(), num()),
        prop::option::of(session_id()),
        num32(),
        num32(),
    )
        .prop_map(
            |((create_rev, mod_rev, version, children_version), owner, data_len, num_children)| {
                Stat {
                    create_rev,
                    mod_rev,
                    version,
                    children_version,
                    ephemeral_owner: owner,
                    data_len,
                    num_children,
                }
            },
        )
        .boxed()
}

fn consistency() -> impl Strategy<Value = Consistency> {
    prop_oneof![Just(Consistency::Linearizable), Just(Consistency::Stale)]
}

fn member() -> impl Strategy<Value = MemberInfo> {
    (num(), text()).prop_map(|(id, client_addr)| MemberInfo { id, client_addr })
}

fn members() -> impl Strategy<Value = Vec<MemberInfo>> {
    prop::collection::vec(member(), 0..4)
}

fn session_seq() -> impl Strategy<Value = SessionSeq> {
    (session_id(), num(), num()).prop_map(|(session, seq, floor)| SessionSeq {
        session,
        seq,
        floor,
    })
}

fn read_op() -> BoxedStrategy<ReadOp> {
    prop_oneof![
        text().prop_map(|path| ReadOp::Get { path }),
        text().prop_map(|path| ReadOp::Stat { path }),
        (text(), prop::option::of(text()), num32()).prop_map(|(path, start_after, limit)| {
            ReadOp::Children {
                path,
                start_after,
                limit,
            }
        }),
        text().prop_map(|name| ReadOp::Lock { name }),
        (prop::option::of(text()), num32())
            .prop_map(|(start_after, limit)| ReadOp::Locks { start_after, limit }),
    ]
    .boxed()
}

fn create_op() -> impl Strategy<Value = CreateOp> {
    (text(), data(), any::<bool>(), any::<bool>()).prop_map(
        |(path, data, ephemeral, sequential)| CreateOp {
            path,
            data,
            ephemeral,
            sequential,
        },
    )
}

fn set_op() -> impl Strategy<Value = SetOp> {
    (text(), data(), prop::option::of(num())).prop_map(|(path, data, expected_version)| SetOp {
        path,
        data,
        expected_version,
    })
}

fn delete_op() -> impl Strategy<Value = DeleteOp> {
    (text(), prop::option::of(num())).prop_map(|(path, expected_version)| DeleteOp {
        path,
        expected_version,
    })
}

fn check_op() -> impl Strategy<Value = CheckOp> {
    (text(), num()).prop_map(|(path, version)| CheckOp { path, version })
}

fn multi_op() -> BoxedStrategy<MultiOp> {
    prop_oneof![
        create_op().prop_map(MultiOp::Create),
        set_op().prop_map(MultiOp::Set),
        delete_op().prop_map(MultiOp::Delete),
        check_op().prop_map(MultiOp::Check),
    ]
    .boxed()
}

fn write_op() -> BoxedStrategy<WriteOp> {
    prop_oneof![
        create_op().prop_map(WriteOp::Create),
        set_op().prop_map(WriteOp::Set),
        delete_op().prop_map(WriteOp::Delete),
        prop::collection::vec(multi_op(), 0..6).prop_map(WriteOp::Multi),
        (
            text(),
            data(),
            any::<bool>(),
            prop::option::of(num()),
            prop::option::of(num())
        )
            .prop_map(|(lock, value, try_only, timeout_ms, lock_delay_ms)| {
                WriteOp::Acquire(AcquireOp {
                    lock,
                    value,
                    try_only,
                    timeout_ms,
                    lock_delay_ms,
                })
            }),
        (text(), num()).prop_map(|(lock, token)| WriteOp::Release(ReleaseOp { lock, token })),
        (text(), num())
            .prop_map(|(lock, acquire_id)| WriteOp::Cancel(CancelOp { lock, acquire_id })),
    ]
    .boxed()
}

fn request() -> BoxedStrategy<Request> {
    prop_oneof![
        (consistency(), read_op()).prop_map(|(consistency, op)| Request::Read { consistency, op }),
        (prop::option::of(session_seq()), write_op())
            .prop_map(|(session, op)| Request::Write { session, op }),
        num().prop_map(|ttl_ms| Request::OpenSession { ttl_ms }),
        session_id().prop_map(|session| Request::CloseSession { session }),
        Just(Request::ClusterStatus),
        (prop::option::of(session_seq()), write_op(), text(), num()).prop_map(
            |(session, op, lock, token)| Request::FencedWrite {
                session,
                op,
                fence: Fence { lock, token }
            }
        ),
        (watch_target(), prop::option::of(num()), any::<bool>()).prop_map(
            |(target, start_revision, with_data)| Request::Watch(WatchRequest {
                target,
                start_revision,
                with_data
            })
        ),
        num().prop_map(|watch_id| Request::CancelWatch { watch_id }),
        member_change().prop_map(Request::ChangeMembers),
        num().prop_map(|to| Request::TransferLeader { to }),
    ]
    .boxed()
}

fn member_change() -> BoxedStrategy<MemberChange> {
    prop_oneof![
        (num(), text(), text()).prop_map(|(id, peer_addr, client_addr)| {
            MemberChange::AddLearner {
                id,
                peer_addr,
                client_addr,
            }
        }),
        num().prop_map(|id| MemberChange::Promote { id }),
        num().prop_map(|id| MemberChange::Remove { id }),
    ]
    .boxed()
}

fn watch_target() -> BoxedStrategy<WatchTarget> {
    prop_oneof![
        text().prop_map(WatchTarget::Node),
        text().prop_map(WatchTarget::Children),
        text().prop_map(WatchTarget::Prefix),
        session_id().prop_map(WatchTarget::Session),
        text().prop_map(WatchTarget::Lock),
    ]
    .boxed()
}

fn event() -> BoxedStrategy<Event> {
    let kind = prop_oneof![
        (text(), stat(), prop::option::of(data()))
            .prop_map(|(path, stat, data)| EventKind::Created { path, stat, data }),
        (text(), stat(), prop::option::of(data()))
            .prop_map(|(path, stat, data)| EventKind::Changed { path, stat, data }),
        text().prop_map(|path| EventKind::Deleted { path }),
        (session_id(), any::<bool>())
            .prop_map(|(session, expired)| EventKind::SessionEnded { session, expired }),
        (text(), num(), session_id(), num(), data()).prop_map(
            |(lock, token, session, acquire_id, value)| EventKind::LockGranted {
                lock,
                token,
                session,
                acquire_id,
                value
            }
        ),
        (text(), num(), session_id()).prop_map(|(lock, token, session)| EventKind::LockReleased {
            lock,
            token,
            session
        }),
        (text(), num(), session_id()).prop_map(|(lock, token, session)| EventKind::LockRevoked {
            lock,
            token,
            session
        }),
        (
            text(),
            num(),
            session_id(),
            prop_oneof![
                Just(WaitEndReason::TimedOut),
                Just(WaitEndReason::Cancelled),
                Just(WaitEndReason::SessionEnded)
            ]
        )
            .prop_map(
                |(lock, acquire_id, session, reason)| EventKind::LockWaitEnded {
                    lock,
                    acquire_id,
                    session,
                    reason
                }
            ),
    ];
    (num(), kind)
        .prop_map(|(revision, kind)| Event { revision, kind })
        .boxed()
}

fn lock_info() -> BoxedStrategy<LockInfo> {
    let holder =
        (num(), session_id(), num(), data()).prop_map(|(token, session, acquire_id, value)| {
            LockHolder {
                token,
                session,
                acquire_id,
                value,
            }
        });
    let waiter = (num(), session_id(), data(), prop::option::of(num())).prop_map(
        |(acquire_id, session, value, deadline_ms)| LockWaiter {
            acquire_id,
            session,
            value,
            deadline_ms,
        },
    );
    (
        text(),
        prop::option::of(holder),
        prop::collection::vec(waiter, 0..3),
        num(),
        prop::option::of(num()),
    )
        .prop_map(
            |(name, holder, waiters, lock_delay_ms, delayed_until_ms)| LockInfo {
                name,
                holder,
                waiters,
                lock_delay_ms,
                delayed_until_ms,
            },
        )
        .boxed()
}

fn hello() -> impl Strategy<Value = Hello> {
    (num32(), text()).prop_map(|(protocol_version, client_name)| Hello {
        protocol_version,
        client_name,
    })
}

fn client_message() -> BoxedStrategy<ClientMessage> {
    prop_oneof![
        hello().prop_map(ClientMessage::Hello),
        (num(), request()).prop_map(|(request_id, request)| ClientMessage::Request {
            request_id,
            request
        }),
        (num(), prop::collection::vec(session_id(), 0..8)).prop_map(|(request_id, sessions)| {
            ClientMessage::KeepAlive {
                request_id,
                sessions,
            }
        }),
    ]
    .boxed()
}

/// Every variant of [`Error`]; `MultiFailed` nests up to 3 deep.
fn error() -> BoxedStrategy<Error> {
    let leaf = prop_oneof![
        (num32(), num32())
            .prop_map(|(client, server)| Error::UnsupportedVersion { client, server }),
        Just(Error::HelloRequired),
        (num(), num()).prop_map(|(len, max)| Error::FrameTooLarge { len, max }),
        text().prop_map(Error::Malformed),
        (text(), text()).prop_map(|(path, reason)| Error::InvalidPath { path, reason }),
        (num(), num()).prop_map(|(len, max)| Error::DataTooLarge { len, max }),
        (num(), num()).prop_map(|(len, max)| Error::RequestTooLarge { len, max }),
        text().prop_map(Error::InvalidArgument),
        text().prop_map(|path| Error::NoNode { path }),
        text().prop_map(|path| Error::NodeExists { path }),
        text().prop_map(|path| Error::NotEmpty { path }),
        (text(), num(), num()).prop_map(|(path, expected, actual)| Error::BadVersion {
            path,
            expected,
            actual
        }),
        text().prop_map(|path| Error::EphemeralParent { path }),
        session_id().prop_map(|session| Error::SessionExpired { session }),
        session_id().prop_map(|session| Error::UnknownSession { session }),
        (session_id(), num(), num()).prop_map(|(session, seq, floor)| Error::StaleRequest {
            session,
            seq,
            floor
        }),
        (session_id(), num(), num(), num()).prop_map(|(session, seq, floor, window)| {
            Error::SeqOutOfWindow {
                session,
                seq,
                floor,
                window,
            }
        }),
        prop::option::of(num()).prop_map(|leader_hint| Error::NotLeader { leader_hint }),
        Just(Error::ShuttingDown),
        text().prop_map(Error::Unavailable),
        text().prop_map(Error::Storage),
        num().prop_map(|len| Error::ResponseTooLarge { len }),
        text().prop_map(Error::Internal),
        text().prop_map(Error::Indeterminate),
        (num(), num())
            .prop_map(|(requested, applied)| Error::FutureRevision { requested, applied }),
        (text(), num()).prop_map(|(lock, token)| Error::FencingRejected { lock, token }),
        (text(), num()).prop_map(|(lock, token)| Error::LockNotHeld { lock, token }),
        (text(), num()).prop_map(|(lock, acquire_id)| Error::NoSuchAcquire { lock, acquire_id }),
        num().prop_map(|oldest| Error::Compacted { oldest }),
        num().prop_map(|resume_from| Error::Lagged { resume_from }),
        num().prop_map(|watch_id| Error::NoSuchWatch { watch_id }),
        text().prop_map(Error::MembershipRefused),
    ];
    leaf.prop_recursive(3, 8, 1, |inner| {
        (num32(), inner).prop_map(|(index, error)| Error::MultiFailed {
            index,
            error: error.into(),
        })
    })
    .boxed()
}

fn multi_result() -> BoxedStrategy<MultiResult> {
    prop_oneof![
        (text(), stat()).prop_map(|(path, stat)| MultiResult::Created { path, stat }),
        stat().prop_map(|stat| MultiResult::Set { stat }),
        Just(MultiResult::Deleted),
        Just(MultiResult::Checked),
    ]
    .boxed()
}

fn write_result() -> BoxedStrategy<WriteResult> {
    prop_oneof![
        (text(), stat()).prop_map(|(path, stat)| WriteResult::Created { path, stat }),
        stat().prop_map(|stat| WriteResult::Set { stat }),
        Just(WriteResult::Deleted),
        prop::collection::vec(multi_result(), 0..6).prop_map(WriteResult::Multi),
        prop_oneof![
            num().prop_map(|token| LockResult::Granted { token }),
            num().prop_map(|waiter_id| LockResult::Queued { waiter_id }),
            Just(LockResult::NotAcquired)
        ]
        .prop_map(WriteResult::Lock),
        Just(WriteResult::Released),
        any::<bool>().prop_map(|released| WriteResult::Cancelled { released }),
    ]
    .boxed()
}

fn session_grant() -> impl Strategy<Value = SessionGrant> {
    (session_id(), num(), num(), num()).prop_map(|(session, ttl_ms, tick_ms, drift_ppm)| {
        SessionGrant {
            session,
            ttl_ms,
            tick_ms,
            drift_ppm,
        }
    })
}

fn cluster_status() -> BoxedStrategy<ClusterStatus> {
    (
        (num(), num(), prop::option::of(num())),
        (num(), num(), num()),
        members(),
        prop::collection::vec(num(), 0..3),
    )
        .prop_map(
            |(
                (cluster_id, node_id, leader),
                (term, commit_index, applied_index),
                members,
                learners,
            )| {
                ClusterStatus {
                    cluster_id,
                    node_id,
                    leader,
                    term,
                    commit_index,
                    applied_index,
                    members,
                    learners,
                }
            },
        )
        .boxed()
}

fn reply() -> BoxedStrategy<Reply> {
    prop_oneof![
        (data(), stat()).prop_map(|(data, stat)| Reply::Node { data, stat }),
        prop::option::of(stat()).prop_map(Reply::Stat),
        (prop::collection::vec(text(), 0..5), any::<bool>())
            .prop_map(|(names, more)| Reply::Children { names, more }),
        write_result().prop_map(Reply::Write),
        session_grant().prop_map(Reply::SessionOpened),
        Just(Reply::SessionClosed),
        cluster_status().prop_map(Reply::ClusterStatus),
        lock_info().prop_map(Reply::Lock),
        (prop::collection::vec(lock_info(), 0..3), any::<bool>())
            .prop_map(|(locks, more)| Reply::Locks { locks, more }),
        (num(), num()).prop_map(|(watch_id, start_revision)| Reply::WatchCreated {
            watch_id,
            start_revision
        }),
        Just(Reply::WatchCancelled),
    ]
    .boxed()
}

fn keepalive_result() -> impl Strategy<Value = KeepAliveResult> {
    prop_oneof![
        num().prop_map(|ttl_ms| KeepAliveResult::Ok { ttl_ms }),
        Just(KeepAliveResult::Expired),
    ]
}

fn session_event_kind() -> impl Strategy<Value = SessionEventKind> {
    prop_oneof![
        Just(SessionEventKind::Expired),
        Just(SessionEventKind::Closed)
    ]
}

fn hello_ok() -> BoxedStrategy<HelloOk> {
    (num32(), num(), num(), prop::option::of(num()), members())
        .prop_map(
            |(protocol_version, node_id, cluster_id, leader_hint, members)| HelloOk {
                protocol_version,
                node_id,
                cluster_id,
                leader_hint,
                members,
            },
        )
        .boxed()
}

fn server_message() -> BoxedStrategy<ServerMessage> {
    prop_oneof![
        hello_ok().prop_map(ServerMessage::HelloOk),
        (
            num(),
            num(),
            prop_oneof![reply().prop_map(Ok), error().prop_map(Err)]
        )
            .prop_map(|(request_id, revision, result)| ServerMessage::Response {
                request_id,
                revision,
                result
            }),
        (
            num(),
            prop::collection::vec((session_id(), keepalive_result()), 0..6)
        )
            .prop_map(|(request_id, results)| ServerMessage::KeepAliveReply {
                request_id,
                results
            }),
        (session_id(), num(), session_event_kind()).prop_map(|(session, revision, event)| {
            ServerMessage::SessionEvent {
                session,
                revision,
                event,
            }
        }),
        error().prop_map(|reason| ServerMessage::Goodbye { reason }),
        (num(), prop::collection::vec(event(), 0..5), any::<bool>()).prop_map(
            |(watch_id, events, revision_complete)| ServerMessage::WatchEvents {
                watch_id,
                events,
                revision_complete
            }
        ),
        (num(), num())
            .prop_map(|(watch_id, revision)| ServerMessage::WatchProgress { watch_id, revision }),
        (num(), error())
            .prop_map(|(watch_id, reason)| ServerMessage::WatchEnded { watch_id, reason }),
    ]
    .boxed()
}

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

type ClientCodec = FrameCodec<ClientMessage, ClientMessage>;
type ServerCodec = FrameCodec<ServerMessage, ServerMessage>;

/// Encodes `item` as one frame with the default limit.
fn frame<T: bincode::Encode>(item: &T) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(item, DEFAULT_MAX_FRAME, &mut buf).expect("encodes");
    buf
}

/// Encodes one message, checks the header, decodes it back and checks nothing is left over.
fn round_trip<T>(msg: &T) -> Result<(), TestCaseError>
where
    T: bincode::Encode + bincode::Decode<()> + PartialEq + std::fmt::Debug + Clone,
{
    let mut codec = FrameCodec::<T, T>::default();
    let mut buf = BytesMut::new();
    codec.encode(msg.clone(), &mut buf).expect("encodes");

    let payload = to_bytes(msg).expect("encodes");
    prop_assert_eq!(&buf[..4], &(payload.len() as u32).to_be_bytes()[..]);
    prop_assert_eq!(&buf[4..], &payload[..]);
    prop_assert_eq!(&from_bytes::<T>(&payload).expect("decodes"), msg);

    let decoded = codec.decode(&mut buf).expect("decodes");
    prop_assert_eq!(decoded.as_ref(), Some(msg));
    prop_assert!(buf.is_empty());
    prop_assert!(codec.decode(&mut buf).expect("empty").is_none());
    Ok(())
}

/// Encodes all `msgs` into one byte string, feeds it to a decoder in chunks cut at `cuts`
/// (arbitrary positions, reduced modulo the length) and checks the same sequence comes out.
fn stream_round_trip<T>(msgs: &[T], cuts: &[usize]) -> Result<(), TestCaseError>
where
    T: bincode::Encode + bincode::Decode<()> + PartialEq + std::fmt::Debug + Clone,
{
    let mut codec = FrameCodec::<T, T>::default();
    let mut wire = BytesMut::new();
    for m in msgs {
        codec.encode(m.clone(), &mut wire).expect("encodes");
    }
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.push(0);
    points.push(wire.len());
    points.sort_unstable();
    points.dedup();

    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for w in points.windows(2) {
        buf.extend_from_slice(&wire[w[0]..w[1]]);
        while let Some(m) = codec.decode(&mut buf).expect("valid stream") {
            out.push(m);
        }
    }
    prop_assert_eq!(out.as_slice(), msgs);
    prop_assert!(buf.is_empty());
    Ok(())
}

/// Decodes everything decodable from `buf`; stops at `Ok(None)` or the first error. Must not
/// panic. Returns how many messages came out and whether it ended in an error.
fn drain<T: bincode::Decode<()>>(codec: &mut FrameCodec<T, T>, buf: &mut BytesMut) -> bool {
    // Each successful decode consumes at least the 4-byte header, so this terminates.
    loop {
        let before = buf.len();
        match codec.decode(buf) {
            Ok(Some(_)) => assert!(buf.len() < before, "decode made no progress"),
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

/// A payload with a length prefix that matches it exactly.
fn with_prefix(payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(payload.len() as u32);
    buf.extend_from_slice(payload);
    buf
}

fn malformed_client(payload: &[u8]) -> bool {
    let mut buf = with_prefix(payload);
    matches!(
        ClientCodec::default().decode(&mut buf),
        Err(FrameError::Malformed(_))
    )
}

fn malformed_server(payload: &[u8]) -> bool {
    let mut buf = with_prefix(payload);
    matches!(
        ServerCodec::default().decode(&mut buf),
        Err(FrameError::Malformed(_))
    )
}

/// Length in bytes of bincode's varint encoding of `n`.
fn varint_len(n: u64) -> usize {
    match n {
        0..=250 => 1,
        251..=0xFFFF => 3,
        0x1_0000..=0xFFFF_FFFF => 5,
        _ => 9,
    }
}

/// A `Hello` whose encoded payload is exactly `len` bytes (`len` ≥ 3). Layout: tag (1 byte),
/// protocol_version (varint: 1, 3 or 5 bytes), name length (varint), name.
fn hello_of_payload_len(len: usize) -> ClientMessage {
    for protocol_version in [1u32, 300, 70_000] {
        let pv_len = varint_len(u64::from(protocol_version));
        for str_varint in [1, 3, 5, 9] {
            let Some(name_len) = len.checked_sub(1 + pv_len + str_varint) else {
                continue;
            };
            if varint_len(name_len as u64) == str_varint {
                return ClientMessage::Hello(Hello {
                    protocol_version,
                    client_name: "x".repeat(name_len),
                });
            }
        }
    }
    panic!("no Hello of {len} bytes");
}

// ------------------------------------------------------------------------------------------
// (a) Round trips
// ------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn client_message_round_trips(msg in client_message()) {
        round_trip(&msg)?;
    }

    #[test]
    fn server_message_round_trips(msg in server_message()) {
        round_trip(&msg)?;
    }

    #[test]
    fn client_stream_split_anywhere_round_trips(
        msgs in prop::collection::vec(client_message(), 1..8),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        stream_round_trip(&msgs, &cuts)?;
    }

    #[test]
    fn server_stream_split_anywhere_round_trips(
        msgs in prop::collection::vec(server_message(), 1..8),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        stream_round_trip(&msgs, &cuts)?;
    }

    #[test]
    fn stream_fed_byte_by_byte_round_trips(
        msgs in prop::collection::vec(server_message(), 1..4),
    ) {
        let cuts: Vec<usize> = (0..512).collect();
        stream_round_trip(&msgs, &cuts)?;
    }
}

#[test]
fn multi_failed_nested_to_the_limit_round_trips() {
    let mut error = Error::NoNode { path: "/a".into() };
    for index in 0..lockd_protocol::error::MAX_CAUSE_DEPTH {
        error = Error::MultiFailed {
            index,
            error: error.into(),
        };
    }
    let msg = ServerMessage::Response {
        request_id: 1,
        revision: 2,
        result: Err(error),
    };
    round_trip(&msg).expect("round trip");
}

#[test]
fn hostile_deep_nesting_is_malformed_not_a_stack_overflow() {
    let config = lockd_protocol::codec::wire_config();
    let leaf = Error::NoNode { path: "/a".into() };
    let leaf_bytes = bincode::encode_to_vec(&leaf, config).unwrap();
    let one = Error::MultiFailed {
        index: 0,
        error: leaf.into(),
    };
    let one_bytes = bincode::encode_to_vec(&one, config).unwrap();
    let prefix = &one_bytes[..one_bytes.len() - leaf_bytes.len()];
    // 100,000 levels in a frame of a few hundred KB, built by hand (encoding it would recurse).
    let mut payload = prefix.repeat(100_000);
    payload.extend_from_slice(&leaf_bytes);
    let decoded = bincode::decode_from_slice::<Error, _>(&payload, config);
    assert!(decoded.is_err(), "deep nesting is refused");
    // A shallow one decodes after a refused one (the depth counter was restored).
    let mut ok = prefix.repeat(2);
    ok.extend_from_slice(&leaf_bytes);
    assert!(bincode::decode_from_slice::<Error, _>(&ok, config).is_ok());
}

// ------------------------------------------------------------------------------------------
// (b) Arbitrary input never panics the decoder
// ------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        // All at once, as both message types.
        let mut buf = BytesMut::from(&bytes[..]);
        drain(&mut ClientCodec::default(), &mut buf);
        let mut buf = BytesMut::from(&bytes[..]);
        drain(&mut ServerCodec::default(), &mut buf);

        // In chunks, stopping at the first error like a connection does.
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let mut codec = ServerCodec::default();
        let mut buf = BytesMut::new();
        for w in points.windows(2) {
            buf.extend_from_slice(&bytes[w[0]..w[1]]);
            if drain(&mut codec, &mut buf) {
                break;
            }
        }
    }

    #[test]
    fn arbitrary_payload_behind_valid_prefix_never_panics(
        payload in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        // The whole frame is there: the answer is a message or an error, never "need more".
        let mut buf = with_prefix(&payload);
        let r = ClientCodec::default().decode(&mut buf);
        prop_assert!(matches!(r, Ok(Some(_)) | Err(FrameError::Malformed(_))), "{r:?}");
        prop_assert!(buf.is_empty(), "a complete frame is consumed either way");

        let mut buf = with_prefix(&payload);
        let r = ServerCodec::default().decode(&mut buf);
        prop_assert!(matches!(r, Ok(Some(_)) | Err(FrameError::Malformed(_))), "{r:?}");
        prop_assert!(buf.is_empty());

        // A prefix promising more than is there: wait for it.
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32 + 1);
        buf.extend_from_slice(&payload);
        prop_assert!(matches!(ClientCodec::default().decode(&mut buf), Ok(None)));
        prop_assert_eq!(buf.len(), payload.len() + 4);
    }

    #[test]
    fn corrupted_valid_frames_never_panic(
        msg in server_message(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        // Corrupt only the payload so the frame stays complete.
        let mut payload = to_bytes(&msg).expect("encodes");
        for (at, byte) in flips {
            let i = at % payload.len();
            payload[i] = byte;
        }
        let mut buf = with_prefix(&payload);
        let r = ServerCodec::default().decode(&mut buf);
        prop_assert!(matches!(r, Ok(Some(_)) | Err(FrameError::Malformed(_))), "{r:?}");
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn corrupted_client_frames_never_panic(
        msg in client_message(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut payload = to_bytes(&msg).expect("encodes");
        for (at, byte) in flips {
            let i = at % payload.len();
            payload[i] = byte;
        }
        let mut buf = with_prefix(&payload);
        let r = ClientCodec::default().decode(&mut buf);
        prop_assert!(matches!(r, Ok(Some(_)) | Err(FrameError::Malformed(_))), "{r:?}");
    }

    #[test]
    fn prefix_above_limit_is_rejected_before_allocating(
        len in (DEFAULT_MAX_FRAME as u32 + 1)..=u32::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut buf = BytesMut::with_capacity(32);
        buf.put_u32(len);
        buf.extend_from_slice(&tail);
        let r = ClientCodec::default().decode(&mut buf);
        prop_assert!(
            matches!(r, Err(FrameError::TooLarge { len: l, max })
                if l == u64::from(len) && max == DEFAULT_MAX_FRAME as u64),
            "{r:?}"
        );
        prop_assert!(buf.capacity() < 1024, "capacity grew to {}", buf.capacity());
    }
}

#[test]
fn max_u32_prefix_is_too_large_and_allocates_nothing() {
    let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF][..]);
    let cap = buf.capacity();
    match ServerCodec::default().decode(&mut buf) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, 0xFFFF_FFFF);
            assert_eq!(max, DEFAULT_MAX_FRAME as u64);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(buf.capacity(), cap);
    assert!(buf.capacity() < 1024);
    // The error maps to the typed wire error the server sends in Goodbye.
    assert_eq!(
        Error::from(FrameError::TooLarge {
            len: 0xFFFF_FFFF,
            max: DEFAULT_MAX_FRAME as u64
        }),
        Error::FrameTooLarge {
            len: 0xFFFF_FFFF,
            max: DEFAULT_MAX_FRAME as u64
        }
    );
}

#[test]
fn short_reads_wait_and_reserve_at_most_the_frame() {
    let mut codec = ClientCodec::new(100);
    let mut buf = BytesMut::new();
    for b in [0u8, 0, 0] {
        buf.put_u8(b);
        assert!(codec.decode(&mut buf).expect("short").is_none());
    }
    buf.put_u8(100);
    assert!(codec.decode(&mut buf).expect("short").is_none());
    assert!(
        buf.capacity() >= 104,
        "reserves room for the announced frame"
    );
    assert!(buf.capacity() < 4096);
}

#[test]
fn lying_length_inside_a_small_frame_is_malformed() {
    // Hello whose client_name claims u64::MAX bytes, and one that claims just under the
    // bincode limit, in a frame of a few bytes: both fail cleanly without reading past the
    // frame.
    let mut huge = vec![0x00, 0x01, 0xFD];
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(malformed_client(&huge));
    let mut big = vec![0x00, 0x01, 0xFC];
    big.extend_from_slice(&((MAX_FRAME_LIMIT as u32) - 16).to_le_bytes());
    assert!(malformed_client(&big));
    // KeepAlive with a sessions vector claiming 2^40 entries.
    let mut many = vec![0x02, 0x00, 0xFD];
    many.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(malformed_client(&many));
}

// ------------------------------------------------------------------------------------------
// (c) The limit is exact
// ------------------------------------------------------------------------------------------

fn check_limit(limit: usize) {
    let at = hello_of_payload_len(limit);
    let over = hello_of_payload_len(limit + 1);
    let mut codec = ClientCodec::new(limit);
    assert_eq!(codec.max_frame(), limit);

    // Encode: exactly the limit is accepted.
    let mut buf = BytesMut::new();
    codec.encode(at.clone(), &mut buf).expect("at the limit");
    assert_eq!(buf.len(), 4 + limit);

    // Decode: exactly the limit is accepted.
    assert_eq!(codec.decode(&mut buf).expect("decodes"), Some(at));
    assert!(buf.is_empty());

    // Encode: one byte over fails and leaves the destination as it was.
    let mut dst = BytesMut::from(&b"earlier frames"[..]);
    match codec.encode(over.clone(), &mut dst) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, limit as u64 + 1);
            assert_eq!(max, limit as u64);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(&dst[..], b"earlier frames");

    // Decode: one byte over is rejected from the header alone, before the payload arrives.
    let mut big = ClientCodec::new(limit + 1);
    let mut buf = BytesMut::new();
    big.encode(over, &mut buf).expect("fits the larger limit");
    let mut header_only = BytesMut::from(&buf[..4]);
    match codec.decode(&mut header_only) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, limit as u64 + 1);
            assert_eq!(max, limit as u64);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        codec.decode(&mut buf),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn frame_limit_is_exact_small() {
    for limit in [3, 4, 250, 253, 254, 1000, 65_538] {
        check_limit(limit);
    }
}

#[test]
fn frame_limit_is_exact_default() {
    check_limit(DEFAULT_MAX_FRAME);
}

#[test]
fn configured_limit_is_clamped() {
    assert_eq!(ClientCodec::new(usize::MAX).max_frame(), MAX_FRAME_LIMIT);
    assert_eq!(ClientCodec::default().max_frame(), DEFAULT_MAX_FRAME);
}

#[test]
fn oversized_encode_stops_at_the_limit() {
    // A 10 MiB message against a 1000-byte limit: refused with its real size, and the buffer
    // never grew much beyond the limit on the way.
    let msg = ClientMessage::Request {
        request_id: 1,
        request: Request::Write {
            session: None,
            op: WriteOp::Set(SetOp {
                path: "/big".into(),
                data: vec![7; 10 << 20],
                expected_version: None,
            }),
        },
    };
    let len = to_bytes(&msg).expect("encodes").len() as u64;
    let mut dst = BytesMut::from(&b"kept"[..]);
    match ClientCodec::new(1000).encode(msg, &mut dst) {
        Err(FrameError::TooLarge { len: l, max }) => {
            assert_eq!(l, len);
            assert_eq!(max, 1000);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(&dst[..], b"kept");
    assert!(dst.capacity() < 64 * 1024, "capacity {}", dst.capacity());
}

#[test]
fn encode_frame_clamps_its_limit() {
    // A payload of MAX_FRAME_LIMIT + 1 bytes must be refused even when the caller passes a
    // larger limit (the length prefix could not describe a frame beyond u32 otherwise).
    let msg = hello_of_payload_len(MAX_FRAME_LIMIT + 1);
    let mut dst = BytesMut::new();
    match encode_frame(&msg, usize::MAX, &mut dst) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, MAX_FRAME_LIMIT as u64 + 1);
            assert_eq!(max, MAX_FRAME_LIMIT as u64);
        }
        other => panic!("{other:?}"),
    }
    assert!(dst.is_empty());
}

// ------------------------------------------------------------------------------------------
// (d) Malformed payloads
// ------------------------------------------------------------------------------------------

#[test]
fn unknown_tags_are_malformed() {
    // ClientMessage has 3 variants (0..=2), ServerMessage 8 (0..=7).
    assert!(malformed_client(&[0x03]));
    assert!(malformed_client(&[0xFA]));
    assert!(malformed_server(&[0x08]));
    // Request tag 10 inside a valid ClientMessage::Request { request_id: 0, .. }; MemberChange
    // tag 3 in a ChangeMembers.
    assert!(malformed_client(&[0x01, 0x00, 0x0A]));
    assert!(malformed_client(&[0x01, 0x00, 0x08, 0x03, 0x00]));
    // ReadOp tag 5 in a Read { Linearizable, .. }; Consistency tag 2.
    assert!(malformed_client(&[0x01, 0x00, 0x00, 0x00, 0x05, 0x00]));
    assert!(malformed_client(&[0x01, 0x00, 0x00, 0x02, 0x00, 0x00]));
    // WriteOp tag 7 in a Write { session: None, .. }; MultiOp tag 4 in a one-op Multi.
    assert!(malformed_client(&[0x01, 0x00, 0x01, 0x00, 0x07]));
    assert!(malformed_client(&[
        0x01, 0x00, 0x01, 0x00, 0x03, 0x01, 0x04
    ]));
    // Option tag 2 (session of a write).
    assert!(malformed_client(&[0x01, 0x00, 0x01, 0x02]));
    // Error tag 33 (one past MembershipRefused) in a Goodbye; Result tag 2 in a Response.
    assert!(malformed_server(&[0x04, 33]));
    assert!(malformed_server(&[0x01, 0x00, 0x00, 0x02]));
    // Reply tag 11, KeepAliveResult tag 2, SessionEventKind tag 2.
    assert!(malformed_server(&[0x01, 0x00, 0x00, 0x00, 0x0B]));
    assert!(malformed_server(&[0x02, 0x00, 0x01, 0x00, 0x02]));
    assert!(malformed_server(&[0x03, 0x00, 0x00, 0x02]));
    // Known last variants still decode (the tables above are right).
    assert!(!malformed_server(&[0x04, 31, 0x00]));
    assert!(!malformed_server(&[0x04, 32, 0x00]));
    assert!(!malformed_client(&[0x01, 0x00, 0x09, 0x05]));
    assert!(!malformed_client(&[0x01, 0x00, 0x08, 0x02, 0x05]));
    assert!(!malformed_server(&[0x01, 0x00, 0x00, 0x00, 0x0A]));
    assert!(!malformed_client(&[0x01, 0x00, 0x07, 0x00]));
    assert!(!malformed_server(&[0x03, 0x00, 0x00, 0x01]));
}

#[test]
fn other_bad_encodings_are_malformed() {
    // Empty payload.
    assert!(malformed_client(&[]));
    // Truncated: Hello without its name.
    assert!(malformed_client(&[0x00, 0x01]));
    // bool 2 (CreateOp::ephemeral) in Write { None, Create { "", [], 2, false } }.
    assert!(malformed_client(&[
        0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00
    ]));
    // Invalid UTF-8 in Hello::client_name.
    assert!(malformed_client(&[0x00, 0x01, 0x02, 0xC3, 0x28]));
    // u32 varint wider than u32 (protocol_version = 2^32 as a u64 varint).
    assert!(malformed_client(&[
        0x00, 0xFD, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00
    ]));
    // Varint marker byte 0xFF (u128) where a u64 is expected (request_id).
    assert!(malformed_client(&[0x02, 0xFF]));
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut payload = to_bytes(&ClientMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: "cli".into(),
    }))
    .expect("encodes");
    assert!(!malformed_client(&payload));
    payload.push(0);
    assert!(malformed_client(&payload));
    match from_bytes::<ClientMessage>(&payload) {
        Err(FrameError::Malformed(m)) => assert!(m.contains("trailing"), "{m}"),
        other => panic!("{other:?}"),
    }

    let mut payload = to_bytes(&ServerMessage::Goodbye {
        reason: Error::ShuttingDown,
    })
    .expect("encodes");
    payload.extend_from_slice(&[1, 2, 3]);
    assert!(malformed_server(&payload));
}

#[test]
fn malformed_frame_is_consumed_and_maps_to_wire_error() {
    // The bad frame is consumed; what follows it is untouched (the server closes anyway).
    let mut buf = with_prefix(&[0x03]);
    buf.extend_from_slice(&frame(&ClientMessage::KeepAlive {
        request_id: 1,
        sessions: vec![],
    }));
    let mut codec = ClientCodec::default();
    let err = codec.decode(&mut buf).expect_err("unknown tag");
    assert!(matches!(Error::from(err), Error::Malformed(_)));
    assert_eq!(
        codec.decode(&mut buf).expect("next frame"),
        Some(ClientMessage::KeepAlive {
            request_id: 1,
            sessions: vec![]
        })
    );
}

// ------------------------------------------------------------------------------------------
// Exact bytes (docs/protocol.md quotes these)
// ------------------------------------------------------------------------------------------

#[test]
fn wire_bytes_of_hello() {
    let msg = ClientMessage::Hello(Hello {
        protocol_version: 1,
        client_name: "cli".into(),
    });
    assert_eq!(
        &frame(&msg)[..],
        [
            0x00, 0x00, 0x00, 0x06, // payload length 6, u32 big-endian
            0x00, // ClientMessage::Hello (variant 0)
            0x01, // protocol_version = 1
            0x03, b'c', b'l', b'i', // client_name: length 3, UTF-8 bytes
        ]
    );
}

#[test]
fn wire_bytes_of_keepalive() {
    let msg = ClientMessage::KeepAlive {
        request_id: 300,
        sessions: vec![SessionId(7), SessionId(70_000)],
    };
    assert_eq!(
        &frame(&msg)[..],
        [
            0x00, 0x00, 0x00, 0x0B, // payload length 11
            0x02, // ClientMessage::KeepAlive (variant 2)
            0xFB, 0x2C, 0x01, // request_id 300: marker 251 then u16 little-endian
            0x02, // 2 sessions
            0x07, // SessionId(7)
            0xFC, 0x70, 0x11, 0x01, 0x00, // SessionId(70000): marker 252 then u32 LE
        ]
    );
}

#[test]
fn wire_bytes_of_write_and_response() {
    let msg = ClientMessage::Request {
        request_id: 5,
        request: Request::Write {
            session: Some(SessionSeq {
                session: SessionId(9),
                seq: 2,
                floor: 1,
            }),
            op: WriteOp::Create(CreateOp {
                path: "/a".into(),
                data: b"x".to_vec(),
                ephemeral: true,
                sequential: false,
            }),
        },
    };
    assert_eq!(
        &frame(&msg)[..],
        [
            0x00, 0x00, 0x00, 0x0F, // payload length 15
            0x01, // ClientMessage::Request
            0x05, // request_id 5
            0x01, // Request::Write
            0x01, 0x09, 0x02, 0x01, // Some(SessionSeq { session 9, seq 2, floor 1 })
            0x00, // WriteOp::Create
            0x02, b'/', b'a', // path "/a"
            0x01, b'x', // data [b'x']
            0x01, 0x00, // ephemeral true, sequential false
        ]
    );

    let reply = ServerMessage::Response {
        request_id: 5,
        revision: 12,
        result: Err(Error::NotLeader {
            leader_hint: Some(2),
        }),
    };
    assert_eq!(
        &frame(&reply)[..],
        [
            0x00, 0x00, 0x00, 0x07, // payload length 7
            0x01, // ServerMessage::Response
            0x05, // request_id 5
            0x0C, // revision 12
            0x01, // Err
            0x12, // Error::NotLeader (variant 18)
            0x01, 0x02, // leader_hint Some(2)
        ]
    );
}
