//! Single namespace operations and reads.

use lockd_protocol::path::MAX_PATH_LEN;
use lockd_protocol::{Error, ReadOp, Reply, SessionId, Stat, WriteResult};

use super::*;

#[test]
fn bootstrap_creates_the_root_once() {
    let mut store = MemStore::default();
    bootstrap(&mut store).unwrap();
    let root = store.nodes.get(&(String::new(), String::new())).cloned();
    assert_eq!(root, Some(NodeRecord::default()));
    assert_eq!(store.nodes.len(), 1);
    let snapshot = store.clone();
    bootstrap(&mut store).unwrap();
    assert_eq!(store, snapshot, "bootstrap is idempotent");

    let h = Harness::new();
    assert_eq!(
        h.read(ReadOp::Get { path: "/".into() }),
        Ok(Reply::Node {
            data: vec![],
            stat: Stat::default()
        })
    );
    assert_eq!(h.stat("/"), Some(Stat::default()));
    assert_eq!(h.children("/", None, 0), Ok((vec![], false)));
}

#[test]
fn create_plain_nested_and_parent_bookkeeping() {
    let mut h = Harness::new();
    let s = h.open();
    let result = h.ok(s, create("/a", b"hello"));
    let rev = h.index;
    let stat = Stat {
        create_rev: rev,
        mod_rev: rev,
        data_len: 5,
        ..Stat::default()
    };
    assert_eq!(
        result,
        WriteResult::Created {
            path: "/a".into(),
            stat: stat.clone()
        }
    );
    assert_eq!(
        h.read(ReadOp::Get { path: "/a".into() }),
        Ok(Reply::Node {
            data: b"hello".to_vec(),
            stat
        })
    );
    let root = h.node("/").unwrap();
    assert_eq!((root.num_children, root.children_version), (1, 1));

    h.ok(s, create("/a/b", b""));
    h.ok(s, create("/a/c", b""));
    let a = h.node("/a").unwrap();
    assert_eq!((a.num_children, a.children_version, a.version), (2, 2, 0));
    assert_eq!(a.mod_rev, rev, "adding children is not a data change");
    assert_eq!(h.node("/a/b").unwrap().ephemeral_owner, None);
    assert!(h.store.ephemerals.is_empty());
}

#[test]
fn create_errors_name_the_right_path() {
    let mut h = Harness::new();
    let s = h.open();
    h.mk(s, "/a");
    assert_eq!(
        h.fail(s, create("/a", b"")),
        Error::NodeExists { path: "/a".into() }
    );
    assert_eq!(
        h.fail(s, create("/", b"")),
        Error::NodeExists { path: "/".into() }
    );
    assert_eq!(
        h.fail(s, create("/x/y", b"")),
        Error::NoNode { path: "/x".into() }
    );
    assert_eq!(
        h.fail(s, create("/a/x/y/z", b"")),
        Error::NoNode {
            path: "/a/x/y".into()
        }
    );
    let root = h.node("/").unwrap();
    assert_eq!(
        (root.num_children, root.children_version),
        (1, 1),
        "failed creates change nothing"
    );
    assert_eq!(h.store.nodes.len(), 2);
}

#[test]
fn ephemeral_nodes_are_indexed_and_have_no_children() {
    let mut h = Harness::new();
    let s = h.open();
    h.mk(s, "/d");
    let result = h.ok(s, create_eph("/d/e"));
    match result {
        WriteResult::Created { stat, .. } => assert_eq!(stat.ephemeral_owner, Some(s)),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.node("/d/e").unwrap().ephemeral_owner, Some(s));
    assert_eq!(
        h.store.ephemerals.keys().cloned().collect::<Vec<_>>(),
        vec![(s, "/d/e".to_string())]
    );
    let before = h.store.clone();
    let seq = h.next_seq(s);
    let applied = h.write(s, create("/d/e/child", b""));
    assert_eq!(
        applied.result,
        Err(Error::EphemeralParent {
            path: "/d/e".into()
        })
    );
    h.assert_only_bookkeeping(&before, Some((s, seq, &applied)));
    assert_eq!(
        h.fail(s, create_seq("/d/e/q-", true)),
        Error::EphemeralParent {
            path: "/d/e".into()
        }
    );
}

#[test]
fn sequential_create_skips_names_taken_by_hand() {
    let mut h = Harness::new();
    let s = h.open();
    h.mk(s, "/q");
    h.mk(s, "/q/n-0000000000");
    h.mk(s, "/q/n-0000000001");
    assert_eq!(
        created_path(&h.ok(s, create_seq("/q/n-", false))),
        "/q/n-0000000002"
    );
    assert_eq!(h.node("/q").unwrap().next_sequence, 3);
}

#[test]
fn sequential_suffixes_come_from_the_parents_counter() {
    let mut h = Harness::new();
    let s = h.open();
    h.mk(s, "/q");
    h.mk(s, "/r");
    let names: Vec<String> = (0..3)
        .map(|_| created_path(&h.ok(s, create_seq("/q/n-", false))).to_string())
        .collect();
    assert_eq!(
        names,
        ["/q/n-0000000000", "/q/n-0000000001", "/q/n-0000000002"]
    );
    // Counters are per parent, shared by every prefix under it.
    assert_eq!(
        created_path(&h.ok(s, create_seq("/r/n-", true))),
        "/r/n-0000000000"
    );
    assert_eq!(
        created_path(&h.ok(s, create_seq("/q/m-", false))),
        "/q/m-0000000003"
    );
    assert_eq!(h.node("/r/n-0000000000").unwrap().ephemeral_owner, Some(s));
    // Plain creates do not consume the counter.
    h.mk(s, "/q/plain");
    let q = h.node("/q").unwrap();
    assert_eq!(
        (q.next_sequence, q.num_children, q.children_version),
        (4, 5, 5)
    );

    // A failed sequential create does not consume it: suffix too long, missing parent, or a
    // failing multi.
    let long = format!("/q/{}", "x".repeat(MAX_PATH_LEN - 3 - 5));
    assert_eq!(long.len(), MAX_PATH_LEN - 5);
    assert!(matches!(
        h.fail(s, create_seq(&long, false)),
        Error::InvalidPath { .. }
    ));
    assert_eq!(
        h.fail(s, create_seq("/nope/n-", false)),
        Error::NoNode {
            path: "/nope".into()
        }
    );
    let multi = WriteOp::Multi(vec![
        MultiOp::Create(cop("/q/n-", b"", false, true)),
        check("/q", 99),
    ]);
    assert!(matches!(
        h.fail(s, multi),
        Error::MultiFailed { index: 1, .. }
    ));
    assert_eq!(h.node("/q").unwrap().next_sequence, 4);
    assert_eq!(
        created_path(&h.ok(s, create_seq("/q/n-", false))),
        "/q/n-0000000004"
    );
    // A path exactly at the limit with its suffix is fine.
    let fits = format!("/q/{}", "y".repeat(MAX_PATH_LEN - 3 - 10));
    assert_eq!(
        created_path(&h.ok(s, create_seq(&fits, false))),
        format!("{fits}0000000005")
    );
}

#[test]
fn get_stat_and_missing_nodes() {
    let mut h = Harness::new();
    let s = h.open();
    let stat = match h.ok(s, create("/a", b"xyz")) {
        WriteResult::Created { stat, .. } => stat,
        other => panic!("{other:?}"),
    };
    assert_eq!(h.stat("/a"), Some(stat));
    assert_eq!(h.stat("/missing"), None);
    assert_eq!(h.stat("/missing/deeper"), None);
    assert_eq!(
        h.read(ReadOp::Get {
            path: "/missing".into()
        }),
        Err(Error::NoNode {
            path: "/missing".into()
        })
    );
    assert_eq!(
        h.children("/missing", None, 0),
        Err(Error::NoNode {
            path: "/missing".into()
        })
    );
}

#[test]
fn children_are_sorted_paged_and_scoped_to_their_parent() {
    let mut h = Harness::new();
    let s = h.open();
    for p in ["/p", "/b", "/pa", "/a"] {
        h.mk(s, p);
    }
    assert_eq!(
        h.children("/", None, 0),
        Ok((vec!["a".into(), "b".into(), "p".into(), "pa".into()], false))
    );
    for i in (0..10).rev() {
        h.mk(s, &format!("/p/c{i:02}"));
    }
    h.mk(s, "/p/c00/grandchild");
    h.mk(s, "/pa/other");
    let names = |r: std::ops::Range<u32>| r.map(|i| format!("c{i:02}")).collect::<Vec<_>>();
    assert_eq!(
        h.children("/p", None, 0),
        Ok((names(0..10), false)),
        "limit 0 = the default page"
    );
    assert_eq!(h.children("/p", None, 4), Ok((names(0..4), true)));
    assert_eq!(h.children("/p", Some("c03"), 4), Ok((names(4..8), true)));
    assert_eq!(h.children("/p", Some("c07"), 4), Ok((names(8..10), false)));
    assert_eq!(
        h.children("/p", Some("c05"), 4),
        Ok((names(6..10), false)),
        "an exact last page"
    );
    assert_eq!(
        h.children("/p", Some("c0"), 2),
        Ok((names(0..2), true)),
        "start_after need not exist"
    );
    assert_eq!(h.children("/p", Some("c09"), 4), Ok((vec![], false)));
    assert_eq!(h.children("/p", Some("zzz"), 4), Ok((vec![], false)));
    assert_eq!(h.children("/p/c01", None, 0), Ok((vec![], false)));
    assert_eq!(
        h.children("/p/c00", None, 0),
        Ok((vec!["grandchild".into()], false))
    );
    // The server's cap bounds any requested page.
    let capped = read(
        &h.store,
        &ReadOp::Children {
            path: "/p".into(),
            start_after: None,
            limit: 0,
        },
        3,
    );
    assert_eq!(
        capped.unwrap(),
        Ok(Reply::Children {
            names: names(0..3),
            more: true
        })
    );
    let capped = read(
        &h.store,
        &ReadOp::Children {
            path: "/p".into(),
            start_after: None,
            limit: 100,
        },
        3,
    );
    assert_eq!(
        capped.unwrap(),
        Ok(Reply::Children {
            names: names(0..3),
            more: true
        })
    );
}

#[test]
fn set_bumps_version_and_mod_rev_and_checks_versions() {
    let mut h = Harness::new();
    let s = h.open();
    h.mk(s, "/a");
    let create_rev = h.index;
    let parent_before = h.node("/").unwrap();
    let result = h.ok(s, set("/a", b"one", None));
    let stat = Stat {
        create_rev,
        mod_rev: h.index,
        version: 1,
        data_len: 3,
        ..Stat::default()
    };
    assert_eq!(result, WriteResult::Set { stat: stat.clone() });
    assert_eq!(h.stat("/a"), Some(stat));
    assert_eq!(
        h.node("/").unwrap(),
        parent_before,
        "a data change is not a children change"
    );

    let result = h.ok(s, set("/a", b"two", Some(1)));
    let stat = Stat {
        create_rev,
        mod_rev: h.index,
        version: 2,
        data_len: 3,
        ..Stat::default()
    };
    assert_eq!(result, WriteResult::Set { stat });
    let rev_two = h.index;

    let before = h.store.clone();
    let seq = h.next_seq(s);
    let applied = h.write(s, set("/a", b"three", Some(5)));
    assert_eq!(
        applied.result,
        Err(Error::BadVersion {
            path: "/a".into(),
            expected: 5,
            actual: 2
        })
    );
    h.assert_only_bookkeeping(&before, Some((s, seq, &applied)));
    let a = h.node("/a").unwrap();
    assert_eq!(
        (a.data.as_slice(), a.version, a.mod_rev, a.create_rev),
        (&b"two"[..], 2, rev_two, create_rev)
    );

    assert_eq!(
        h.fail(s, set("/missing", b"", None)),
        Error::NoNode {
            path: "/missing".into()
        }
    );
    assert_eq!(
        h.fail(s, set("/missing", b"", Some(0))),
        Error::NoNode {
            path: "/missing".into()
        }
    );
    // The root holds data like any node.
    h.ok(s, set("/", b"root", Some(0)));
    assert_eq!(h.node("/").unwrap().version, 1);
}

#[test]
fn delete_checks_version_children_existence_and_root() {
    let mut h = Harness::new();
    let s = h.open();
    h.mk(s, "/a");
    h.mk(s, "/a/b");
    h.mk(s, "/a/c");
    h.ok(s, set("/a/b", b"x", None));
    assert_eq!(
        h.fail(s, delete("/a", None)),
        Error::NotEmpty { path: "/a".into() }
    );
    assert_eq!(
        h.fail(s, delete("/a", Some(0))),
        Error::NotEmpty { path: "/a".into() }
    );
    assert_eq!(
        h.fail(s, delete("/a/b", Some(0))),
        Error::BadVersion {
            path: "/a/b".into(),
            expected: 0,
            actual: 1
        }
    );
    assert_eq!(
        h.fail(s, delete("/a/zz", None)),
        Error::NoNode {
            path: "/a/zz".into()
        }
    );
    assert_eq!(
        h.fail(s, delete("/zz/zz", None)),
        Error::NoNode {
            path: "/zz/zz".into()
        }
    );
    assert!(matches!(
        h.fail(s, delete("/", None)),
        Error::InvalidArgument(_)
    ));
    assert!(matches!(
        h.fail(s, delete("/", Some(0))),
        Error::InvalidArgument(_)
    ));
    assert!(h.node("/").is_some());

    let a = h.node("/a").unwrap();
    assert_eq!((a.num_children, a.children_version), (2, 2));
    assert_eq!(h.ok(s, delete("/a/b", Some(1))), WriteResult::Deleted);
    assert_eq!(h.ok(s, delete("/a/c", None)), WriteResult::Deleted);
    assert_eq!(h.node("/a/b"), None);
    let a = h.node("/a").unwrap();
    assert_eq!((a.num_children, a.children_version, a.version), (0, 4, 0));
    assert_eq!(h.ok(s, delete("/a", Some(0))), WriteResult::Deleted);
    let root = h.node("/").unwrap();
    assert_eq!((root.num_children, root.children_version), (0, 2));
    assert_eq!(h.store.nodes.len(), 1);
    // A deleted name can be created again, fresh.
    h.mk(s, "/a");
    assert_eq!(h.node("/a").unwrap().create_rev, h.index);
}

#[test]
fn deleting_an_ephemeral_node_unindexes_it() {
    let mut h = Harness::new();
    let s = h.open();
    let other = h.open();
    h.ok(s, create_eph("/e"));
    assert_eq!(h.ok(other, delete("/e", None)), WriteResult::Deleted);
    assert!(h.store.ephemerals.is_empty());
    // Closing the owner later has nothing left to delete.
    h.mk(other, "/e");
    h.close(s);
    assert!(h.node("/e").is_some());
}

#[test]
fn invalid_paths_are_rejected_for_writes_and_reads() {
    let mut h = Harness::new();
    let s = h.open();
    h.mk(s, "/a");
    let too_long = format!("/{}", "x".repeat(MAX_PATH_LEN));
    let bad = [
        "a",
        "a/b",
        "",
        "/a//b",
        "//",
        "/a/",
        "/a/../b",
        "/..",
        "/a/.",
        "/a\0b",
        "/a\nb",
        too_long.as_str(),
    ];
    for p in bad {
        let nodes_before = h.store.nodes.clone();
        let invalid = |e: &Error| matches!(e, Error::InvalidPath { .. });
        for op in [
            create(p, b""),
            create_eph(p),
            create_seq(p, false),
            set(p, b"", None),
            delete(p, None),
        ] {
            let before = h.store.clone();
            let seq = h.next_seq(s);
            let applied = h.write(s, op.clone());
            assert!(
                applied.result.as_ref().is_err_and(invalid),
                "{op:?}: {:?}",
                applied.result
            );
            h.assert_only_bookkeeping(&before, Some((s, seq, &applied)));
        }
        let multi = WriteOp::Multi(vec![check(p, 0)]);
        let err = h.fail(s, multi);
        assert!(
            matches!(&err, Error::MultiFailed { index: 0, error } if invalid(error)),
            "{err:?}"
        );
        for op in [
            ReadOp::Get { path: p.into() },
            ReadOp::Stat { path: p.into() },
            ReadOp::Children {
                path: p.into(),
                start_after: None,
                limit: 0,
            },
        ] {
            let result = h.read(op.clone());
            assert!(result.as_ref().is_err_and(invalid), "{op:?}: {result:?}");
        }
        assert_eq!(h.store.nodes, nodes_before);
    }
}

#[test]
fn a_write_is_owned_by_its_session_id_not_by_the_entry() {
    // Session ids are entry indexes: the first session opened after bootstrap is 1.
    let mut h = Harness::new();
    let s = h.open();
    assert_eq!(s, SessionId(1));
    h.ok(s, create_eph("/x"));
    assert_eq!(h.node("/x").unwrap().ephemeral_owner, Some(SessionId(1)));
}
