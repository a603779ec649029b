//! `multi`: all-or-nothing, in order, each operation seeing the earlier ones.

use lockd_protocol::{Cause, Error, MultiOp, MultiResult, Stat, WriteOp, WriteResult};

use super::*;

/// A small tree: /a (version 2), /a/b, /c (ephemeral), /q with a used sequential counter.
fn populated() -> (Harness, SessionId) {
    let mut h = Harness::new();
    let s = h.open();
    h.mk(s, "/a");
    h.ok(s, set("/a", b"1", None));
    h.ok(s, set("/a", b"2", None));
    h.mk(s, "/a/b");
    h.ok(s, create_eph("/c"));
    h.mk(s, "/q");
    h.ok(s, create_seq("/q/n-", false));
    (h, s)
}

#[test]
fn a_failing_op_at_index_k_applies_nothing() {
    let good = || {
        vec![
            MultiOp::Create(cop("/new", b"x", false, false)),
            MultiOp::Create(cop("/new/child", b"", true, false)),
            MultiOp::Create(cop("/q/n-", b"", false, true)),
            MultiOp::Set(sop("/q", b"3", Some(0))),
            check("/q", 1),
        ]
    };
    let failing: Vec<(MultiOp, Error)> = vec![
        (
            MultiOp::Create(cop("/a", b"", false, false)),
            Error::NodeExists { path: "/a".into() },
        ),
        (
            MultiOp::Create(cop("/zz/y", b"", false, false)),
            Error::NoNode { path: "/zz".into() },
        ),
        (
            MultiOp::Create(cop("/c/y", b"", false, false)),
            Error::EphemeralParent { path: "/c".into() },
        ),
        (
            MultiOp::Set(sop("/a", b"", Some(0))),
            Error::BadVersion {
                path: "/a".into(),
                expected: 0,
                actual: 2,
            },
        ),
        (
            MultiOp::Set(sop("/zz", b"", None)),
            Error::NoNode { path: "/zz".into() },
        ),
        (
            MultiOp::Delete(dop("/q", None)),
            Error::NotEmpty { path: "/q".into() },
        ),
        (
            MultiOp::Delete(dop("/zz", None)),
            Error::NoNode { path: "/zz".into() },
        ),
        (
            check("/a/b", 7),
            Error::BadVersion {
                path: "/a/b".into(),
                expected: 7,
                actual: 0,
            },
        ),
        (check("/zz", 0), Error::NoNode { path: "/zz".into() }),
    ];
    for (k, (bad, error)) in failing.into_iter().enumerate() {
        for position in [0, 1, 5] {
            let (mut h, s) = populated();
            // A prefix of good ops whose effects (buffered, then dropped) do not fix the failure.
            let mut ops = good();
            ops.truncate(position);
            let index = ops.len() as u32;
            ops.push(bad.clone());
            ops.push(MultiOp::Create(cop("/after", b"", false, false)));
            let before = h.store.clone();
            let seq = h.next_seq(s);
            let applied = h.write(s, WriteOp::Multi(ops));
            let expected = Error::MultiFailed {
                index,
                error: Cause::from(error.clone()),
            };
            assert_eq!(applied.result, Err(expected), "case {k} at {position}");
            assert_eq!(applied.revision, h.index);
            h.assert_only_bookkeeping(&before, Some((s, seq, &applied)));
        }
    }
}

#[test]
fn a_whole_good_multi_applies_in_order_at_one_revision() {
    let (mut h, s) = populated();
    let result = h.ok(
        s,
        WriteOp::Multi(vec![
            MultiOp::Create(cop("/p", b"", false, false)),
            MultiOp::Create(cop("/p/c", b"d", false, false)),
            check("/p/c", 0),
            MultiOp::Set(sop("/p/c", b"dd", Some(0))),
            check("/p/c", 1),
            MultiOp::Delete(dop("/p/c", Some(1))),
            MultiOp::Create(cop("/p/c", b"", true, false)),
            MultiOp::Create(cop("/q/n-", b"", false, true)),
            MultiOp::Create(cop("/q/n-", b"", false, true)),
            MultiOp::Delete(dop("/a/b", None)),
            MultiOp::Delete(dop("/a", Some(2))),
            check("/p", 0),
        ]),
    );
    let rev = h.index;
    let fresh = |data_len, version, ephemeral_owner| Stat {
        create_rev: rev,
        mod_rev: rev,
        version,
        data_len,
        ephemeral_owner,
        ..Stat::default()
    };
    let expected = vec![
        MultiResult::Created {
            path: "/p".into(),
            stat: fresh(0, 0, None),
        },
        MultiResult::Created {
            path: "/p/c".into(),
            stat: fresh(1, 0, None),
        },
        MultiResult::Checked,
        MultiResult::Set {
            stat: fresh(2, 1, None),
        },
        MultiResult::Checked,
        MultiResult::Deleted,
        MultiResult::Created {
            path: "/p/c".into(),
            stat: fresh(0, 0, Some(s)),
        },
        MultiResult::Created {
            path: "/q/n-0000000001".into(),
            stat: fresh(0, 0, None),
        },
        MultiResult::Created {
            path: "/q/n-0000000002".into(),
            stat: fresh(0, 0, None),
        },
        MultiResult::Deleted,
        MultiResult::Deleted,
        MultiResult::Checked,
    ];
    assert_eq!(result, WriteResult::Multi(expected));
    let p = h.node("/p").unwrap();
    assert_eq!((p.num_children, p.children_version), (1, 3));
    assert_eq!(h.node("/p/c").unwrap().ephemeral_owner, Some(s));
    assert!(h.store.ephemerals.contains_key(&(s, "/p/c".to_string())));
    assert_eq!(h.node("/a"), None);
    assert_eq!(h.node("/a/b"), None);
    let q = h.node("/q").unwrap();
    assert_eq!((q.next_sequence, q.num_children), (3, 3));
    let root = h.node("/").unwrap();
    // /a, /c, /q before; +/p -/a.
    assert_eq!(root.num_children, 3);
}

#[test]
fn create_then_check_and_delete_then_create() {
    let (mut h, s) = populated();
    let result = h.ok(
        s,
        WriteOp::Multi(vec![
            MultiOp::Create(cop("/n", b"", false, false)),
            check("/n", 0),
        ]),
    );
    assert!(matches!(result, WriteResult::Multi(r) if r.len() == 2));
    let err = h.fail(
        s,
        WriteOp::Multi(vec![
            MultiOp::Create(cop("/m", b"", false, false)),
            check("/m", 1),
        ]),
    );
    let bad = Error::BadVersion {
        path: "/m".into(),
        expected: 1,
        actual: 0,
    };
    assert_eq!(
        err,
        Error::MultiFailed {
            index: 1,
            error: Cause::from(bad)
        }
    );
    assert_eq!(h.node("/m"), None);

    // Replacing /a (version 2, created long ago) with a fresh node in one revision.
    let old_create = h.node("/a").unwrap().create_rev;
    h.ok(
        s,
        WriteOp::Multi(vec![
            MultiOp::Delete(dop("/a/b", None)),
            MultiOp::Delete(dop("/a", Some(2))),
            MultiOp::Create(cop("/a", b"new", false, false)),
        ]),
    );
    let a = h.node("/a").unwrap();
    assert_ne!(a.create_rev, old_create);
    assert_eq!(
        (a.version, a.create_rev, a.num_children, a.data.as_slice()),
        (0, h.index, 0, &b"new"[..])
    );

    // Deleting an ephemeral and re-creating it plain leaves no index entry behind.
    h.ok(
        s,
        WriteOp::Multi(vec![
            MultiOp::Delete(dop("/c", None)),
            MultiOp::Create(cop("/c", b"", false, false)),
        ]),
    );
    assert_eq!(h.node("/c").unwrap().ephemeral_owner, None);
    assert!(h.store.ephemerals.is_empty());
    // And an ephemeral created and deleted within one multi leaves nothing either.
    h.ok(
        s,
        WriteOp::Multi(vec![
            MultiOp::Create(cop("/t", b"", true, false)),
            MultiOp::Delete(dop("/t", None)),
        ]),
    );
    assert!(h.store.ephemerals.is_empty());
    assert_eq!(h.node("/t"), None);
}

#[test]
fn later_ops_see_deletions_and_ephemerality_of_earlier_ones() {
    let (mut h, s) = populated();
    let err = h.fail(
        s,
        WriteOp::Multi(vec![
            MultiOp::Delete(dop("/a/b", None)),
            MultiOp::Create(cop("/a/b/x", b"", false, false)),
        ]),
    );
    assert_eq!(
        err,
        Error::MultiFailed {
            index: 1,
            error: Cause::from(Error::NoNode {
                path: "/a/b".into()
            })
        }
    );
    let err = h.fail(
        s,
        WriteOp::Multi(vec![
            MultiOp::Create(cop("/e", b"", true, false)),
            MultiOp::Create(cop("/e/x", b"", false, false)),
        ]),
    );
    assert_eq!(
        err,
        Error::MultiFailed {
            index: 1,
            error: Cause::from(Error::EphemeralParent { path: "/e".into() })
        }
    );
    let err = h.fail(
        s,
        WriteOp::Multi(vec![
            MultiOp::Create(cop("/a/z", b"", false, false)),
            MultiOp::Delete(dop("/a", Some(2))),
        ]),
    );
    assert_eq!(
        err,
        Error::MultiFailed {
            index: 1,
            error: Cause::from(Error::NotEmpty { path: "/a".into() })
        }
    );
    let err = h.fail(
        s,
        WriteOp::Multi(vec![
            MultiOp::Delete(dop("/a/b", None)),
            MultiOp::Delete(dop("/a/b", None)),
        ]),
    );
    assert_eq!(
        err,
        Error::MultiFailed {
            index: 1,
            error: Cause::from(Error::NoNode {
                path: "/a/b".into()
            })
        }
    );
    assert!(h.node("/a/b").is_some());
}

#[test]
fn check_passes_or_fails_on_version() {
    let (mut h, s) = populated();
    let before = h.store.clone();
    let seq = h.next_seq(s);
    let applied = h.write(
        s,
        WriteOp::Multi(vec![check("/a", 2), check("/a/b", 0), check("/", 0)]),
    );
    let checked = vec![MultiResult::Checked; 3];
    assert_eq!(
        applied.result,
        Ok(Reply::Write(WriteResult::Multi(checked)))
    );
    h.assert_only_bookkeeping(&before, Some((s, seq, &applied)));
    let err = h.fail(s, WriteOp::Multi(vec![check("/a", 2), check("/a", 1)]));
    let bad = Error::BadVersion {
        path: "/a".into(),
        expected: 1,
        actual: 2,
    };
    assert_eq!(
        err,
        Error::MultiFailed {
            index: 1,
            error: Cause::from(bad)
        }
    );
}

#[test]
fn an_empty_multi_succeeds_and_changes_nothing() {
    let (mut h, s) = populated();
    let before = h.store.clone();
    let seq = h.next_seq(s);
    let applied = h.write(s, WriteOp::Multi(vec![]));
    assert_eq!(applied.result, Ok(Reply::Write(WriteResult::Multi(vec![]))));
    assert_eq!(applied.revision, h.index);
    h.assert_only_bookkeeping(&before, Some((s, seq, &applied)));
}
