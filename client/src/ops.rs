//! Request builders for the namespace operations and their response types.
//!
//! Each builder collects options and implements [`IntoFuture`], so `.await` sends it:
//! `client.set("/a", data).if_version(3).await?`. Writes go through a session when one is
//! given (`.session(&s)`, or built from [`Session`] methods), through the client's default
//! session when they need one (ephemeral creates), and otherwise without a session.

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use lockd_protocol::{
    CheckOp, Consistency, CreateOp, DeleteOp, Fence, MultiOp, MultiResult, ReadOp, Reply, Request,
    Revision, SetOp, Stat, WriteOp, WriteResult,
};

use crate::client::{unexpected, Client, Policy};
use crate::error::{check_path, Error, Result};
use crate::recipes::lock::LockGuard;
use crate::session::Session;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A created node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// The node's path (with the sequential suffix, if any).
    pub path: String,
    /// Its stat.
    pub stat: Stat,
    /// Revision of the create.
    pub revision: Revision,
}

/// A node's data and stat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetResponse {
    /// The data.
    pub data: Vec<u8>,
    /// The stat.
    pub stat: Stat,
    /// Revision the answer reflects.
    pub revision: Revision,
}

/// Result of a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetResponse {
    /// The node's new stat.
    pub stat: Stat,
    /// Revision of the write.
    pub revision: Revision,
}

/// Result of a delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteResponse {
    /// Revision of the delete.
    pub revision: Revision,
}

/// A node's children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildrenResponse {
    /// Child names (not paths) in byte order.
    pub names: Vec<String>,
    /// Revision of the last page. Listings of several pages are not one atomic snapshot.
    pub revision: Revision,
}

/// A node's stat, if it exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatResponse {
    /// `None` when the node does not exist.
    pub stat: Option<Stat>,
    /// Revision the answer reflects.
    pub revision: Revision,
}

/// Results of a successful multi, one per operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiResponse {
    /// Per-operation results, in order.
    pub results: Vec<MultiResult>,
    /// Revision of the write.
    pub revision: Revision,
}

fn consistency(stale: bool) -> Consistency {
    if stale {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    }
}

async fn read(client: &Client, stale: bool, op: ReadOp) -> Result<(Revision, Reply)> {
    client
        .execute(
            Request::Read {
                consistency: consistency(stale),
                op,
            },
            Policy::Idempotent,
        )
        .await
}

async fn write(
    client: &Client,
    session: Option<&Session>,
    needs_session: bool,
    op: WriteOp,
    fence: Option<Fence>,
) -> Result<(Revision, WriteResult)> {
    let (revision, reply) = match session {
        Some(s) => s.write_fenced(op, fence).await?,
        None if needs_session => {
            let s = client.default_session().await?;
            s.write_fenced(op, fence).await?
        }
        None => {
            let request = match fence {
                None => Request::Write { session: None, op },
                Some(fence) => Request::FencedWrite {
                    session: None,
                    op,
                    fence,
                },
            };
            client.execute(request, Policy::Once).await?
        }
    };
    match reply {
        Reply::Write(w) => Ok((revision, w)),
        other => Err(unexpected("a write", &other)),
    }
}

/// The `fence` and `fenced` options shared by the write builders.
macro_rules! fence_methods {
    () => {
        /// Apply only while `guard`'s grant holds its lock (else `FencingRejected`).
        pub fn fence(self, guard: &LockGuard) -> Self {
            self.fenced(guard.name(), guard.token())
        }

        /// Apply only while `lock` is held under the grant with `token`, whoever sends the
        /// write (else `FencingRejected`).
        pub fn fenced(mut self, lock: impl Into<String>, token: u64) -> Self {
            self.fence = Some(Fence {
                lock: lock.into(),
                token,
            });
            self
        }
    };
}

fn wrong_write(what: &str, w: &WriteResult) -> Error {
    Error::Protocol(format!("unexpected write result for {what}: {w:?}"))
}

/// Builder of a create; see [`Client::create`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct CreateBuilder<'a> {
    client: &'a Client,
    session: Option<&'a Session>,
    fence: Option<Fence>,
    op: CreateOp,
}

impl<'a> CreateBuilder<'a> {
    /// The node is deleted when its session ends. Without [`CreateBuilder::session`] the
    /// client's default session owns it.
    pub fn ephemeral(mut self) -> Self {
        self.op.ephemeral = true;
        self
    }

    /// Append the parent's 10-digit sequence counter to the name.
    pub fn sequential(mut self) -> Self {
        self.op.sequential = true;
        self
    }

    /// Make the write through `session` (exactly-once retries; owner of ephemerals).
    pub fn session(mut self, session: &'a Session) -> Self {
        self.session = Some(session);
        self
    }

    fence_methods!();
}

impl<'a> IntoFuture for CreateBuilder<'a> {
    type Output = Result<Created>;
    type IntoFuture = BoxFuture<'a, Created>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            check_path(&self.op.path)?;
            let needs = self.op.ephemeral;
            match write(
                self.client,
                self.session,
                needs,
                WriteOp::Create(self.op),
                self.fence,
            )
            .await?
            {
                (revision, WriteResult::Created { path, stat }) => Ok(Created {
                    path,
                    stat,
                    revision,
                }),
                (_, w) => Err(wrong_write("create", &w)),
            }
        })
    }
}

/// Builder of a get; see [`Client::get`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct GetBuilder<'a> {
    client: &'a Client,
    path: String,
    stale: bool,
}

impl GetBuilder<'_> {
    /// Serve from the answering node's applied state (may lag; the revision says how far).
    pub fn stale(mut self) -> Self {
        self.stale = true;
        self
    }
}

impl<'a> IntoFuture for GetBuilder<'a> {
    type Output = Result<GetResponse>;
    type IntoFuture = BoxFuture<'a, GetResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            check_path(&self.path)?;
            match read(self.client, self.stale, ReadOp::Get { path: self.path }).await? {
                (revision, Reply::Node { data, stat }) => Ok(GetResponse {
                    data,
                    stat,
                    revision,
                }),
                (_, other) => Err(unexpected("Get", &other)),
            }
        })
    }
}

/// Builder of a set; see [`Client::set`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct SetBuilder<'a> {
    client: &'a Client,
    session: Option<&'a Session>,
    fence: Option<Fence>,
    op: SetOp,
}

impl<'a> SetBuilder<'a> {
    /// Only if the node's version is `version` (compare-and-set); else `BadVersion`.
    pub fn if_version(mut self, version: u64) -> Self {
        self.op.expected_version = Some(version);
        self
    }

    /// Make the write through `session` (exactly-once retries).
    pub fn session(mut self, session: &'a Session) -> Self {
        self.session = Some(session);
        self
    }

    fence_methods!();
}

impl<'a> IntoFuture for SetBuilder<'a> {
    type Output = Result<SetResponse>;
    type IntoFuture = BoxFuture<'a, SetResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            check_path(&self.op.path)?;
            match write(
                self.client,
                self.session,
                false,
                WriteOp::Set(self.op),
                self.fence,
            )
            .await?
            {
                (revision, WriteResult::Set { stat }) => Ok(SetResponse { stat, revision }),
                (_, w) => Err(wrong_write("set", &w)),
            }
        })
    }
}

/// Builder of a delete; see [`Client::delete`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct DeleteBuilder<'a> {
    client: &'a Client,
    session: Option<&'a Session>,
    fence: Option<Fence>,
    op: DeleteOp,
}

impl<'a> DeleteBuilder<'a> {
    /// Only if the node's version is `version`; else `BadVersion`.
    pub fn if_version(mut self, version: u64) -> Self {
        self.op.expected_version = Some(version);
        self
    }

    /// Make the write through `session` (exactly-once retries).
    pub fn session(mut self, session: &'a Session) -> Self {
        self.session = Some(session);
        self
    }

    fence_methods!();
}

impl<'a> IntoFuture for DeleteBuilder<'a> {
    type Output = Result<DeleteResponse>;
    type IntoFuture = BoxFuture<'a, DeleteResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            check_path(&self.op.path)?;
            match write(
                self.client,
                self.session,
                false,
                WriteOp::Delete(self.op),
                self.fence,
            )
            .await?
            {
                (revision, WriteResult::Deleted) => Ok(DeleteResponse { revision }),
                (_, w) => Err(wrong_write("delete", &w)),
            }
        })
    }
}

/// Builder of a children listing; see [`Client::children`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct ChildrenBuilder<'a> {
    client: &'a Client,
    path: String,
    stale: bool,
    page_size: u32,
}

impl ChildrenBuilder<'_> {
    /// Serve from the answering node's applied state.
    pub fn stale(mut self) -> Self {
        self.stale = true;
        self
    }

    /// Names per request (0, the default, lets the server choose).
    pub fn page_size(mut self, n: u32) -> Self {
        self.page_size = n;
        self
    }
}

impl<'a> IntoFuture for ChildrenBuilder<'a> {
    type Output = Result<ChildrenResponse>;
    type IntoFuture = BoxFuture<'a, ChildrenResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            check_path(&self.path)?;
            let mut names: Vec<String> = Vec::new();
            loop {
                let op = ReadOp::Children {
                    path: self.path.clone(),
                    start_after: names.last().cloned(),
                    limit: self.page_size,
                };
                match read(self.client, self.stale, op).await? {
                    (revision, Reply::Children { names: page, more }) => {
                        let progressed = !page.is_empty();
                        names.extend(page);
                        if !more {
                            return Ok(ChildrenResponse { names, revision });
                        }
                        if !progressed {
                            return Err(Error::Protocol(
                                "children page empty but more = true".into(),
                            ));
                        }
                    }
                    (_, other) => return Err(unexpected("Children", &other)),
                }
            }
        })
    }
}

/// Builder of a stat; see [`Client::stat`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct StatBuilder<'a> {
    client: &'a Client,
    path: String,
    stale: bool,
}

impl StatBuilder<'_> {
    /// Serve from the answering node's applied state.
    pub fn stale(mut self) -> Self {
        self.stale = true;
        self
    }
}

impl<'a> IntoFuture for StatBuilder<'a> {
    type Output = Result<StatResponse>;
    type IntoFuture = BoxFuture<'a, StatResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            check_path(&self.path)?;
            match read(self.client, self.stale, ReadOp::Stat { path: self.path }).await? {
                (revision, Reply::Stat(stat)) => Ok(StatResponse { stat, revision }),
                (_, other) => Err(unexpected("Stat", &other)),
            }
        })
    }
}

/// Builder of an atomic multi-operation; see [`Client::multi`].
#[derive(Debug)]
#[must_use = "a builder does nothing until awaited"]
pub struct MultiBuilder<'a> {
    client: &'a Client,
    session: Option<&'a Session>,
    fence: Option<Fence>,
    ops: Vec<MultiOp>,
}

impl<'a> MultiBuilder<'a> {
    /// Adds any operation.
    pub fn op(mut self, op: MultiOp) -> Self {
        self.ops.push(op);
        self
    }

    /// Adds a create of a persistent node.
    pub fn create(self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.op(MultiOp::Create(CreateOp {
            path: path.into(),
            data: data.into(),
            ephemeral: false,
            sequential: false,
        }))
    }

    /// Adds an unconditional set.
    pub fn set(self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.op(MultiOp::Set(SetOp {
            path: path.into(),
            data: data.into(),
            expected_version: None,
        }))
    }

    /// Adds a set at an expected version.
    pub fn set_if_version(
        self,
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
        version: u64,
    ) -> Self {
        self.op(MultiOp::Set(SetOp {
            path: path.into(),
            data: data.into(),
            expected_version: Some(version),
        }))
    }

    /// Adds an unconditional delete.
    pub fn delete(self, path: impl Into<String>) -> Self {
        self.op(MultiOp::Delete(DeleteOp {
            path: path.into(),
            expected_version: None,
        }))
    }

    /// Adds a delete at an expected version.
    pub fn delete_if_version(self, path: impl Into<String>, version: u64) -> Self {
        self.op(MultiOp::Delete(DeleteOp {
            path: path.into(),
            expected_version: Some(version),
        }))
    }

    /// Adds a version check: the multi fails unless the node has `version`.
    pub fn check(self, path: impl Into<String>, version: u64) -> Self {
        self.op(MultiOp::Check(CheckOp {
            path: path.into(),
            version,
        }))
    }

    /// Make the write through `session` (exactly-once retries; owner of ephemerals).
    pub fn session(mut self, session: &'a Session) -> Self {
        self.session = Some(session);
        self
    }

    fence_methods!();
}

impl<'a> IntoFuture for MultiBuilder<'a> {
    type Output = Result<MultiResponse>;
    type IntoFuture = BoxFuture<'a, MultiResponse>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let mut needs_session = false;
            for op in &self.ops {
                let path = match op {
                    MultiOp::Create(c) => {
                        needs_session |= c.ephemeral;
                        &c.path
                    }
                    MultiOp::Set(s) => &s.path,
                    MultiOp::Delete(d) => &d.path,
                    MultiOp::Check(c) => &c.path,
                };
                check_path(path)?;
            }
            let op = WriteOp::Multi(self.ops);
            match write(self.client, self.session, needs_session, op, self.fence).await? {
                (revision, WriteResult::Multi(results)) => Ok(MultiResponse { results, revision }),
                (_, w) => Err(wrong_write("multi", &w)),
            }
        })
    }
}

fn create_op(path: String, data: Vec<u8>) -> CreateOp {
    CreateOp {
        path,
        data,
        ephemeral: false,
        sequential: false,
    }
}

impl Client {
    /// Creates a node (persistent unless `.ephemeral()`).
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// let created = client.create("/jobs/job-", b"payload".to_vec()).sequential().await?;
    /// println!("{} at revision {}", created.path, created.revision);
    /// # Ok(()) }
    /// ```
    pub fn create(&self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> CreateBuilder<'_> {
        CreateBuilder {
            client: self,
            session: None,
            fence: None,
            op: create_op(path.into(), data.into()),
        }
    }

    /// Reads a node's data and stat (linearizable unless `.stale()`).
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// let got = client.get("/config").stale().await?;
    /// println!("version {} at revision {}", got.stat.version, got.revision);
    /// # Ok(()) }
    /// ```
    pub fn get(&self, path: impl Into<String>) -> GetBuilder<'_> {
        GetBuilder {
            client: self,
            path: path.into(),
            stale: false,
        }
    }

    /// Replaces a node's data (compare-and-set with `.if_version(v)`).
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// client.set("/config", b"v2".to_vec()).if_version(1).await?;
    /// # Ok(()) }
    /// ```
    pub fn set(&self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> SetBuilder<'_> {
        SetBuilder {
            client: self,
            session: None,
            fence: None,
            op: SetOp {
                path: path.into(),
                data: data.into(),
                expected_version: None,
            },
        }
    }

    /// Deletes a node (only at a version with `.if_version(v)`).
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// client.delete("/config").await?;
    /// # Ok(()) }
    /// ```
    pub fn delete(&self, path: impl Into<String>) -> DeleteBuilder<'_> {
        DeleteBuilder {
            client: self,
            session: None,
            fence: None,
            op: DeleteOp {
                path: path.into(),
                expected_version: None,
            },
        }
    }

    /// Lists a node's children, paging through the server's answers.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// for name in client.children("/workers").await?.names {
    ///     println!("{name}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn children(&self, path: impl Into<String>) -> ChildrenBuilder<'_> {
        ChildrenBuilder {
            client: self,
            path: path.into(),
            stale: false,
            page_size: 0,
        }
    }

    /// A node's stat, or `None` if it does not exist.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// if let Some(stat) = client.stat("/config").await?.stat {
    ///     println!("version {}", stat.version);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stat(&self, path: impl Into<String>) -> StatBuilder<'_> {
        StatBuilder {
            client: self,
            path: path.into(),
            stale: false,
        }
    }

    /// Whether a node exists.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// let present: bool = client.exists("/config").await?;
    /// # Ok(()) }
    /// ```
    pub async fn exists(&self, path: impl Into<String>) -> Result<bool> {
        Ok(self.stat(path).await?.stat.is_some())
    }

    /// An atomic batch: all operations apply, in order, or none does.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// client.multi()
    ///     .check("/config", 3)
    ///     .set("/config", b"v4".to_vec())
    ///     .create("/config-history/4", b"v4".to_vec())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn multi(&self) -> MultiBuilder<'_> {
        MultiBuilder {
            client: self,
            session: None,
            fence: None,
            ops: Vec::new(),
        }
    }
}

impl Session {
    /// Creates a node through this session (`.ephemeral()` makes the session its owner).
    ///
    /// ```no_run
    /// # async fn demo(session: lockd_client::Session) -> Result<(), lockd_client::Error> {
    /// session.create("/workers/w1", b"".to_vec()).ephemeral().await?;
    /// # Ok(()) }
    /// ```
    pub fn create(&self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> CreateBuilder<'_> {
        self.client.create(path, data).session(self)
    }

    /// Sets a node's data through this session.
    pub fn set(&self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> SetBuilder<'_> {
        self.client.set(path, data).session(self)
    }

    /// Deletes a node through this session.
    pub fn delete(&self, path: impl Into<String>) -> DeleteBuilder<'_> {
        self.client.delete(path).session(self)
    }

    /// An atomic batch through this session.
    pub fn multi(&self) -> MultiBuilder<'_> {
        self.client.multi().session(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientConfig;

    #[tokio::test]
    async fn builders_record_their_options() {
        let client = Client::unconnected(ClientConfig::default());
        let c = client.create("/a", b"x".to_vec()).ephemeral().sequential();
        assert!(c.op.ephemeral && c.op.sequential && c.session.is_none());
        assert_eq!(c.op.data, b"x");
        let s = client.set("/a", "y").if_version(4);
        assert_eq!(s.op.expected_version, Some(4));
        let d = client.delete("/a").if_version(2);
        assert_eq!(d.op.expected_version, Some(2));
        assert!(client.get("/a").stale().stale);
        let ch = client.children("/").stale().page_size(10);
        assert!(ch.stale && ch.page_size == 10);
        assert!(!client.stat("/a").stale);
        let m = client
            .multi()
            .create("/m", "1")
            .set("/m", "2")
            .set_if_version("/m", "3", 1)
            .delete("/n")
            .delete_if_version("/o", 5)
            .check("/p", 6);
        assert_eq!(m.ops.len(), 6);
        assert_eq!(
            m.ops[5],
            MultiOp::Check(CheckOp {
                path: "/p".into(),
                version: 6
            })
        );
    }

    #[tokio::test]
    async fn invalid_paths_fail_before_connecting() {
        // Nothing listens at this client's endpoint: the error must come from validation.
        let client = Client::unconnected(ClientConfig::new(["127.0.0.1:1"]));
        for err in [
            client.get("x").await.map(drop),
            client.create("/a/", "").await.map(drop),
            client.set("/a/../b", "").await.map(drop),
            client.multi().check("/ok", 1).delete("bad").await.map(drop),
        ] {
            assert!(
                matches!(
                    err,
                    Err(Error::Invalid(lockd_protocol::Error::InvalidPath { .. }))
                ),
                "{err:?}"
            );
        }
    }
}
