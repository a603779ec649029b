//! Namespace operations: create, set, delete, check, multi, and reads.
//!
//! Writes run against an [`Overlay`] that buffers changes in ordered maps and reaches the
//! store only when every operation succeeded, which makes `multi` all-or-nothing and keeps a
//! failed single operation from leaving partial changes (a bumped sequence counter, say).

use std::collections::BTreeMap;

use lockd_protocol::path;
use lockd_protocol::{
    CheckOp, CreateOp, DeleteOp, Error, EventKind, MultiOp, MultiResult, ReadOp, Reply, SessionId,
    SetOp, Stat, WriteOp, WriteResult,
};

use super::store::{FsmRead, FsmStore, NodeRecord, StoreError};

/// Taken sequential names skipped before a sequential create gives up with `NodeExists`.
const MAX_SEQUENTIAL_PROBES: u32 = 64;

/// Default page size of a children listing.
const DEFAULT_CHILDREN_PAGE: usize = 1000;

/// Splits a valid path into the (parent, name) key of the nodes table; the root is ("", "").
pub fn split_path(p: &str) -> (&str, &str) {
    match path::parent(p) {
        Some(parent) => (parent, path::name(p)),
        None => ("", ""),
    }
}

/// The client-visible stat of a stored node.
pub fn stat_of(node: &NodeRecord) -> Stat {
    Stat {
        create_rev: node.create_rev,
        mod_rev: node.mod_rev,
        version: node.version,
        children_version: node.children_version,
        ephemeral_owner: node.ephemeral_owner,
        data_len: node.data.len() as u32,
        num_children: node.num_children,
    }
}

/// Buffered writes over a store.
struct Overlay<'a, S> {
    store: &'a mut S,
    nodes: BTreeMap<String, Option<NodeRecord>>,
    ephemerals: BTreeMap<(SessionId, String), bool>,
    /// Watch events of the changes, in order; dropped with the overlay on failure.
    events: Vec<EventKind>,
}

impl<'a, S: FsmStore> Overlay<'a, S> {
    fn new(store: &'a mut S) -> Self {
        Overlay {
            store,
            nodes: BTreeMap::new(),
            ephemerals: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    fn get(&self, p: &str) -> Result<Option<NodeRecord>, StoreError> {
        if let Some(node) = self.nodes.get(p) {
            return Ok(node.clone());
        }
        let (parent, name) = split_path(p);
        self.store.node(parent, name)
    }

    fn put(&mut self, p: &str, node: NodeRecord) {
        self.nodes.insert(p.to_string(), Some(node));
    }

    fn remove(&mut self, p: &str) {
        self.nodes.insert(p.to_string(), None);
    }

    /// Writes the buffered changes; returns their events.
    fn commit(self) -> Result<Vec<EventKind>, StoreError> {
        for (p, node) in &self.nodes {
            let (parent, name) = split_path(p);
            match node {
                Some(node) => self.store.put_node(parent, name, node)?,
                None => self.store.remove_node(parent, name)?,
            }
        }
        for ((session, p), added) in &self.ephemerals {
            if *added {
                self.store.add_ephemeral(*session, p)?;
            } else {
                self.store.remove_ephemeral(*session, p)?;
            }
        }
        Ok(self.events)
    }
}

/// Applies one write operation at revision `rev` for `session`. The outer `Result` is a store
/// failure; the inner one is the client's answer. Nothing is written unless it is `Ok`.
pub fn apply_op<S: FsmStore>(
    store: &mut S,
    rev: u64,
    session: SessionId,
    op: &WriteOp,
    events: &mut Vec<EventKind>,
) -> Result<Result<WriteResult, Error>, StoreError> {
    let mut overlay = Overlay::new(store);
    let result = match op {
        WriteOp::Create(c) => create(&mut overlay, rev, session, c)?
            .map(|(path, stat)| WriteResult::Created { path, stat }),
        WriteOp::Set(s) => set(&mut overlay, rev, s)?.map(|stat| WriteResult::Set { stat }),
        WriteOp::Delete(d) => delete(&mut overlay, rev, d)?.map(|()| WriteResult::Deleted),
        WriteOp::Multi(ops) => multi(&mut overlay, rev, session, ops)?.map(WriteResult::Multi),
        WriteOp::Acquire(_) | WriteOp::Release(_) | WriteOp::Cancel(_) => {
            return Ok(Err(Error::Internal(
                "lock operations are applied by fsm::locks".into(),
            )))
        }
    };
    if result.is_ok() {
        events.extend(overlay.commit()?);
    }
    Ok(result)
}

type OpResult<T> = Result<Result<T, Error>, StoreError>;

fn multi<S: FsmStore>(
    overlay: &mut Overlay<'_, S>,
    rev: u64,
    session: SessionId,
    ops: &[MultiOp],
) -> OpResult<Vec<MultiResult>> {
    let mut results = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let one = match op {
            MultiOp::Create(c) => create(overlay, rev, session, c)?
                .map(|(path, stat)| MultiResult::Created { path, stat }),
            MultiOp::Set(s) => set(overlay, rev, s)?.map(|stat| MultiResult::Set { stat }),
            MultiOp::Delete(d) => delete(overlay, rev, d)?.map(|()| MultiResult::Deleted),
            MultiOp::Check(c) => check(overlay, c)?.map(|()| MultiResult::Checked),
        };
        match one {
            Ok(r) => results.push(r),
            Err(error) => {
                return Ok(Err(Error::MultiFailed {
                    index: index as u32,
                    error: error.into(),
                }))
            }
        }
    }
    Ok(Ok(results))
}

fn create<S: FsmStore>(
    overlay: &mut Overlay<'_, S>,
    rev: u64,
    session: SessionId,
    op: &CreateOp,
) -> OpResult<(String, Stat)> {
    if let Err(e) = path::validate(&op.path) {
        return Ok(Err(e));
    }
    let Some(parent_path) = path::parent(&op.path) else {
        return Ok(Err(Error::NodeExists {
            path: op.path.clone(),
        }));
    };
    let Some(mut parent) = overlay.get(parent_path)? else {
        return Ok(Err(Error::NoNode {
            path: parent_path.to_string(),
        }));
    };
    if parent.ephemeral_owner.is_some() {
        return Ok(Err(Error::EphemeralParent {
            path: parent_path.to_string(),
        }));
    }
    let full_path = if op.sequential {
        // A name taken by hand (say `/q/n-0000000005` created directly) is skipped rather
        // than failing every later sequential create under this parent.
        let mut found = None;
        for _ in 0..MAX_SEQUENTIAL_PROBES {
            let candidate = format!("{}{:010}", op.path, parent.next_sequence);
            parent.next_sequence += 1;
            if overlay.get(&candidate)?.is_none() {
                found = Some(candidate);
                break;
            }
        }
        match found {
            Some(p) => p,
            None => {
                return Ok(Err(Error::NodeExists {
                    path: op.path.clone(),
                }))
            }
        }
    } else {
        op.path.clone()
    };
    if full_path.len() > path::MAX_PATH_LEN {
        return Ok(Err(Error::InvalidPath {
            path: op.path.clone(),
            reason: "longer than 1024 bytes with its sequence suffix".to_string(),
        }));
    }
    if overlay.get(&full_path)?.is_some() {
        return Ok(Err(Error::NodeExists { path: full_path }));
    }
    let owner = op.ephemeral.then_some(session);
    let node = NodeRecord {
        data: op.data.clone(),
        create_rev: rev,
        mod_rev: rev,
        ephemeral_owner: owner,
        ..NodeRecord::default()
    };
    let stat = stat_of(&node);
    parent.num_children += 1;
    parent.children_version += 1;
    overlay.put(parent_path, parent);
    let data = Some(node.data.clone());
    overlay.events.push(EventKind::Created {
        path: full_path.clone(),
        stat: stat.clone(),
        data,
    });
    overlay.put(&full_path, node);
    if let Some(owner) = owner {
        overlay.ephemerals.insert((owner, full_path.clone()), true);
    }
    Ok(Ok((full_path, stat)))
}

fn existing<S: FsmStore>(overlay: &Overlay<'_, S>, p: &str) -> OpResult<NodeRecord> {
    if let Err(e) = path::validate(p) {
        return Ok(Err(e));
    }
    Ok(overlay.get(p)?.ok_or_else(|| Error::NoNode {
        path: p.to_string(),
    }))
}

fn version_matches(p: &str, expected: Option<u64>, node: &NodeRecord) -> Result<(), Error> {
    match expected {
        Some(expected) if expected != node.version => Err(Error::BadVersion {
            path: p.to_string(),
            expected,
            actual: node.version,
        }),
        _ => Ok(()),
    }
}

fn set<S: FsmStore>(overlay: &mut Overlay<'_, S>, rev: u64, op: &SetOp) -> OpResult<Stat> {
    let mut node = match existing(overlay, &op.path)? {
        Ok(node) => node,
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = version_matches(&op.path, op.expected_version, &node) {
        return Ok(Err(e));
    }
    node.data = op.data.clone();
    node.version += 1;
    node.mod_rev = rev;
    let stat = stat_of(&node);
    let data = Some(node.data.clone());
    overlay.events.push(EventKind::Changed {
        path: op.path.clone(),
        stat: stat.clone(),
        data,
    });
    overlay.put(&op.path, node);
    Ok(Ok(stat))
}

fn delete<S: FsmStore>(overlay: &mut Overlay<'_, S>, _rev: u64, op: &DeleteOp) -> OpResult<()> {
    if op.path == "/" {
        return Ok(Err(Error::InvalidArgument(
            "the root node cannot be deleted".to_string(),
        )));
    }
    let node = match existing(overlay, &op.path)? {
        Ok(node) => node,
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = version_matches(&op.path, op.expected_version, &node) {
        return Ok(Err(e));
    }
    if node.num_children > 0 {
        return Ok(Err(Error::NotEmpty {
            path: op.path.clone(),
        }));
    }
    unlink(overlay, &op.path, &node)?;
    Ok(Ok(()))
}

/// Removes a childless node and updates its parent and its owner's ephemeral set.
fn unlink<S: FsmStore>(
    overlay: &mut Overlay<'_, S>,
    p: &str,
    node: &NodeRecord,
) -> Result<(), StoreError> {
    if let Some(parent_path) = path::parent(p) {
        if let Some(mut parent) = overlay.get(parent_path)? {
            parent.num_children = parent.num_children.saturating_sub(1);
            parent.children_version += 1;
            overlay.put(parent_path, parent);
        }
    }
    if let Some(owner) = node.ephemeral_owner {
        overlay.ephemerals.insert((owner, p.to_string()), false);
    }
    overlay.events.push(EventKind::Deleted {
        path: p.to_string(),
    });
    overlay.remove(p);
    Ok(())
}

fn check<S: FsmStore>(overlay: &mut Overlay<'_, S>, op: &CheckOp) -> OpResult<()> {
    let node = match existing(overlay, &op.path)? {
        Ok(node) => node,
        Err(e) => return Ok(Err(e)),
    };
    Ok(version_matches(&op.path, Some(op.version), &node))
}

/// Deletes an ephemeral node of an ending session (it has no children by construction).
pub fn delete_ephemeral<S: FsmStore>(
    store: &mut S,
    _rev: u64,
    session: SessionId,
    p: &str,
) -> Result<Vec<EventKind>, StoreError> {
    let mut overlay = Overlay::new(store);
    match overlay.get(p)? {
        Some(node) if node.ephemeral_owner == Some(session) => unlink(&mut overlay, p, &node)?,
        // A stale index entry: drop it.
        _ => {
            overlay.ephemerals.insert((session, p.to_string()), false);
        }
    }
    overlay.commit()
}

/// Serves a read.
pub fn read<S: FsmRead>(store: &S, op: &ReadOp, max_children: usize) -> OpResult<Reply> {
    let p = match op {
        ReadOp::Get { path } | ReadOp::Stat { path } | ReadOp::Children { path, .. } => path,
        ReadOp::Lock { .. } | ReadOp::Locks { .. } => {
            return Ok(Err(Error::Internal(
                "lock reads are served by fsm::read".into(),
            )))
        }
    };
    if let Err(e) = path::validate(p) {
        return Ok(Err(e));
    }
    let (parent, name) = split_path(p);
    let node = store.node(parent, name)?;
    Ok(match (op, node) {
        (ReadOp::Stat { .. }, node) => Ok(Reply::Stat(node.as_ref().map(stat_of))),
        (_, None) => Err(Error::NoNode { path: p.clone() }),
        (ReadOp::Get { .. }, Some(node)) => {
            let stat = stat_of(&node);
            Ok(Reply::Node {
                data: node.data,
                stat,
            })
        }
        (
            ReadOp::Children {
                start_after, limit, ..
            },
            Some(_),
        ) => {
            let limit = match *limit as usize {
                0 => DEFAULT_CHILDREN_PAGE,
                n => n,
            }
            .min(max_children);
            let (names, more) = store.children(p, start_after.as_deref(), limit)?;
            Ok(Reply::Children { names, more })
        }
        (ReadOp::Lock { .. } | ReadOp::Locks { .. }, Some(_)) => {
            Err(Error::Internal("lock reads are served by fsm::read".into()))
        }
    })
}
