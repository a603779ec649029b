//! Named exclusive locks: FIFO waiters, grants with fencing tokens, lock-delay, timeouts.
//!
//! Each acquire is its own grant or waiter, identified by the revision of its entry (the
//! acquire id); a grant's token is the revision of the entry that granted it, so tokens only
//! grow (DESIGN §3a.11). Release hands the lock to the next waiter in the same entry. A
//! session's end revokes its grants (then, on expiry, blocks new grants for the lock-delay)
//! and drops its waits (§3a.12). Every change is an event of the session's and the lock's
//! streams. Pure: time is the entry's time.

use lockd_protocol::{
    AcquireOp, CancelOp, Error, EventKind, LockHolder, LockResult, LockWaiter, ReleaseOp,
    SessionId, WaitEndReason, WriteResult,
};

use super::store::{FsmStore, LockRecord, StoreError};

/// Longest lock name, in bytes.
pub const MAX_LOCK_NAME: usize = 256;
/// Longest lock-delay (Chubby's bound).
pub const MAX_LOCK_DELAY_MS: u64 = 60_000;

/// A deadline the leader must act on by proposing an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockTimer {
    /// The lock's delay ends at this entry time: propose `EndLockDelay`, but only after
    /// holding leadership for `delay_ms`.
    DelayEnds {
        lock: String,
        at_ms: u64,
        delay_ms: u64,
    },
    /// A waiter's timeout: propose `ExpireWaiters`.
    WaiterDeadline {
        lock: String,
        acquire_id: u64,
        at_ms: u64,
    },
}

/// Checks a lock name: 1 to 256 bytes, no control characters.
pub fn validate_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > MAX_LOCK_NAME || name.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "invalid lock name {:?}: 1 to {MAX_LOCK_NAME} bytes, no control characters",
            name.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// What a lock operation changed, besides its result.
#[derive(Debug, Default)]
pub struct LockEffects {
    pub events: Vec<EventKind>,
    pub timers: Vec<LockTimer>,
}

fn save<S: FsmStore>(store: &mut S, name: &str, lock: &LockRecord) -> Result<(), StoreError> {
    let idle = lock.holder.is_none()
        && lock.waiters.is_empty()
        && lock.delayed_until_ms.is_none()
        && lock.lock_delay_ms == 0;
    if idle {
        store.remove_lock(name)
    } else {
        store.put_lock(name, lock)
    }
}

/// Grants the lock to the first waiter, unless it is held or in its delay.
/// The waiter's (session, lock, acquire id) index entry, made when it queued, stays valid.
fn grant_next(rev: u64, name: &str, lock: &mut LockRecord, fx: &mut LockEffects) {
    if lock.holder.is_some() || lock.delayed_until_ms.is_some() || lock.waiters.is_empty() {
        return;
    }
    let waiter = lock.waiters.remove(0);
    fx.events.push(EventKind::LockGranted {
        lock: name.to_string(),
        token: rev,
        session: waiter.session,
        acquire_id: waiter.acquire_id,
        value: waiter.value.clone(),
    });
    lock.holder = Some(LockHolder {
        token: rev,
        session: waiter.session,
        acquire_id: waiter.acquire_id,
        value: waiter.value,
    });
}

/// Applies an acquire by `session` at revision `rev`.
pub fn acquire<S: FsmStore>(
    store: &mut S,
    rev: u64,
    time_ms: u64,
    session: SessionId,
    op: &AcquireOp,
    fx: &mut LockEffects,
) -> Result<Result<WriteResult, Error>, StoreError> {
    if let Err(e) = validate_name(&op.lock) {
        return Ok(Err(e));
    }
    if op.lock_delay_ms.is_some_and(|d| d > MAX_LOCK_DELAY_MS) {
        return Ok(Err(Error::InvalidArgument(format!(
            "lock-delay is at most {MAX_LOCK_DELAY_MS} ms"
        ))));
    }
    let mut lock = store.lock(&op.lock)?.unwrap_or_default();
    if let Some(delay) = op.lock_delay_ms {
        lock.lock_delay_ms = delay;
    }
    let free = lock.holder.is_none() && lock.waiters.is_empty() && lock.delayed_until_ms.is_none();
    let result = if free {
        fx.events.push(EventKind::LockGranted {
            lock: op.lock.clone(),
            token: rev,
            session,
            acquire_id: rev,
            value: op.value.clone(),
        });
        lock.holder = Some(LockHolder {
            token: rev,
            session,
            acquire_id: rev,
            value: op.value.clone(),
        });
        store.add_session_lock(session, &op.lock, rev)?;
        LockResult::Granted { token: rev }
    } else if op.try_only {
        LockResult::NotAcquired
    } else {
        let deadline_ms = op.timeout_ms.map(|t| time_ms.saturating_add(t));
        if let Some(at_ms) = deadline_ms {
            fx.timers.push(LockTimer::WaiterDeadline {
                lock: op.lock.clone(),
                acquire_id: rev,
                at_ms,
            });
        }
        lock.waiters.push(LockWaiter {
            acquire_id: rev,
            session,
            value: op.value.clone(),
            deadline_ms,
        });
        store.add_session_lock(session, &op.lock, rev)?;
        LockResult::Queued { waiter_id: rev }
    };
    save(store, &op.lock, &lock)?;
    Ok(Ok(WriteResult::Lock(result)))
}

/// Releases the grant `token`: the next waiter gets the lock in this entry.
pub fn release<S: FsmStore>(
    store: &mut S,
    rev: u64,
    op: &ReleaseOp,
    fx: &mut LockEffects,
) -> Result<Result<WriteResult, Error>, StoreError> {
    let not_held = || Error::LockNotHeld {
        lock: op.lock.clone(),
        token: op.token,
    };
    let Some(mut lock) = store.lock(&op.lock)? else {
        return Ok(Err(not_held()));
    };
    match &lock.holder {
        Some(holder) if holder.token == op.token => {}
        _ => return Ok(Err(not_held())),
    }
    release_holder(store, rev, &op.lock, &mut lock, fx)?;
    save(store, &op.lock, &lock)?;
    Ok(Ok(WriteResult::Released))
}

fn release_holder<S: FsmStore>(
    store: &mut S,
    rev: u64,
    name: &str,
    lock: &mut LockRecord,
    fx: &mut LockEffects,
) -> Result<(), StoreError> {
    if let Some(holder) = lock.holder.take() {
        store.remove_session_lock(holder.session, name, holder.acquire_id)?;
        fx.events.push(EventKind::LockReleased {
            lock: name.to_string(),
            token: holder.token,
            session: holder.session,
        });
    }
    grant_next(rev, name, lock, fx);
    Ok(())
}

/// Cancel-or-release: withdraws a wait, or releases the grant it became.
pub fn cancel<S: FsmStore>(
    store: &mut S,
    rev: u64,
    op: &CancelOp,
    fx: &mut LockEffects,
) -> Result<Result<WriteResult, Error>, StoreError> {
    let missing = || Error::NoSuchAcquire {
        lock: op.lock.clone(),
        acquire_id: op.acquire_id,
    };
    let Some(mut lock) = store.lock(&op.lock)? else {
        return Ok(Err(missing()));
    };
    let released = if lock
        .holder
        .as_ref()
        .is_some_and(|h| h.acquire_id == op.acquire_id)
    {
        release_holder(store, rev, &op.lock, &mut lock, fx)?;
        true
    } else if let Some(i) = lock
        .waiters
        .iter()
        .position(|w| w.acquire_id == op.acquire_id)
    {
        let waiter = lock.waiters.remove(i);
        store.remove_session_lock(waiter.session, &op.lock, waiter.acquire_id)?;
        fx.events.push(EventKind::LockWaitEnded {
            lock: op.lock.clone(),
            acquire_id: waiter.acquire_id,
            session: waiter.session,
            reason: WaitEndReason::Cancelled,
        });
        false
    } else {
        return Ok(Err(missing()));
    };
    save(store, &op.lock, &lock)?;
    Ok(Ok(WriteResult::Cancelled { released }))
}

/// Ends a session's grants and waits. On expiry (not a clean close) a revoked lock with a
/// lock-delay grants nothing until a leader's `EndLockDelay` entry (DESIGN §3a.12).
pub fn end_session<S: FsmStore>(
    store: &mut S,
    rev: u64,
    time_ms: u64,
    session: SessionId,
    expired: bool,
    fx: &mut LockEffects,
) -> Result<(), StoreError> {
    for (name, acquire_id) in store.session_locks(session)? {
        store.remove_session_lock(session, &name, acquire_id)?;
        let Some(mut lock) = store.lock(&name)? else {
            continue;
        };
        if let Some(holder) = lock.holder.as_ref().filter(|h| h.acquire_id == acquire_id) {
            fx.events.push(EventKind::LockRevoked {
                lock: name.clone(),
                token: holder.token,
                session,
            });
            lock.holder = None;
            if expired && lock.lock_delay_ms > 0 {
                let at_ms = time_ms.saturating_add(lock.lock_delay_ms);
                lock.delayed_until_ms = Some(at_ms);
                let delay_ms = lock.lock_delay_ms;
                fx.timers.push(LockTimer::DelayEnds {
                    lock: name.clone(),
                    at_ms,
                    delay_ms,
                });
            } else {
                grant_next(rev, &name, &mut lock, fx);
            }
        } else if let Some(i) = lock.waiters.iter().position(|w| w.acquire_id == acquire_id) {
            lock.waiters.remove(i);
            fx.events.push(EventKind::LockWaitEnded {
                lock: name.clone(),
                acquire_id,
                session,
                reason: WaitEndReason::SessionEnded,
            });
        }
        save(store, &name, &lock)?;
    }
    Ok(())
}

/// A leader's `EndLockDelay`: applies only if the entry time has reached the delay's end.
pub fn end_delay<S: FsmStore>(
    store: &mut S,
    rev: u64,
    time_ms: u64,
    name: &str,
    fx: &mut LockEffects,
) -> Result<(), StoreError> {
    let Some(mut lock) = store.lock(name)? else {
        return Ok(());
    };
    match lock.delayed_until_ms {
        Some(until) if time_ms >= until => {
            lock.delayed_until_ms = None;
            grant_next(rev, name, &mut lock, fx);
            save(store, name, &lock)
        }
        _ => Ok(()),
    }
}

/// A leader's `ExpireWaiters`: ends the named waits whose deadline the entry time reached.
pub fn expire_waiters<S: FsmStore>(
    store: &mut S,
    time_ms: u64,
    name: &str,
    acquire_ids: &[u64],
    fx: &mut LockEffects,
) -> Result<(), StoreError> {
    let Some(mut lock) = store.lock(name)? else {
        return Ok(());
    };
    let mut kept = Vec::with_capacity(lock.waiters.len());
    for waiter in std::mem::take(&mut lock.waiters) {
        let due = waiter.deadline_ms.is_some_and(|d| d <= time_ms);
        if due && acquire_ids.contains(&waiter.acquire_id) {
            store.remove_session_lock(waiter.session, name, waiter.acquire_id)?;
            fx.events.push(EventKind::LockWaitEnded {
                lock: name.to_string(),
                acquire_id: waiter.acquire_id,
                session: waiter.session,
                reason: WaitEndReason::TimedOut,
            });
        } else {
            kept.push(waiter);
        }
    }
    lock.waiters = kept;
    save(store, name, &lock)
}

/// The timers a new leader must arm for the locks in `store` (after a restart).
pub fn timers_of(name: &str, lock: &LockRecord) -> Vec<LockTimer> {
    let mut timers = Vec::new();
    if let Some(at_ms) = lock.delayed_until_ms {
        timers.push(LockTimer::DelayEnds {
            lock: name.to_string(),
            at_ms,
            delay_ms: lock.lock_delay_ms,
        });
    }
    for waiter in &lock.waiters {
        if let Some(at_ms) = waiter.deadline_ms {
            timers.push(LockTimer::WaiterDeadline {
                lock: name.to_string(),
                acquire_id: waiter.acquire_id,
                at_ms,
            });
        }
    }
    timers
}

/// Whether `token` currently holds `name` (the fencing check).
pub fn holds<S: FsmStore>(store: &S, name: &str, token: u64) -> Result<bool, StoreError> {
    Ok(store
        .lock(name)?
        .and_then(|l| l.holder)
        .is_some_and(|h| h.token == token))
}
