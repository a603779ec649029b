//! The snapshot format: a serialized dump of the state machine's redb tables at one applied
//! index (DESIGN §4: "a snapshot is a consistent redb read transaction"), and its restore.
//!
//! # Format (version 1)
//!
//! All integers little-endian.
//!
//! ```text
//! header   "LOCKSNAP" | u32 version = 1 | u64 index | u64 term
//! record*  u8 table id (1..=8) | u32 key length | key | u32 value length | value
//! trailer  u8 0 (end marker) | u64 record count | u32 CRC-32 (IEEE) of every preceding byte
//! ```
//!
//! Table ids: 1 `nodes`, 2 `sessions`, 3 `ephemerals`, 4 `dedup`, 5 `fsm_meta` (the applied
//! state and the configuration as of the applied index), 6 `locks`, 7 `session_locks`,
//! 8 `events` (the watch history). Keys are the table's key tuple encoded with bincode's
//! standard configuration (strings as `String`), so decoding a hostile key fails with an error
//! instead of a panic; values are copied verbatim (they are already bincode records, decoded
//! by the state machine with errors, never panics). Records come table by table in key order,
//! so two nodes with equal state at the same index produce byte-identical snapshots.
//!
//! A snapshot arrives from the network: [`verify`] checks the header against the expected
//! (index, term), the checksum, the end marker and the record count before [`restore`]
//! touches any table, and `restore` runs inside the caller's write transaction, so a failure
//! half-way aborts with the old state intact.

use bincode::config::standard;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};

use super::tables::{DEDUP, EPHEMERALS, EVENTS, FSM_META, LOCKS, NODES, SESSIONS, SESSION_LOCKS};
use super::StorageError;

const MAGIC: &[u8; 8] = b"LOCKSNAP";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8;
const TRAILER_LEN: usize = 1 + 8 + 4;

const T_NODES: u8 = 1;
const T_SESSIONS: u8 = 2;
const T_EPHEMERALS: u8 = 3;
const T_DEDUP: u8 = 4;
const T_FSM_META: u8 = 5;
const T_LOCKS: u8 = 6;
const T_SESSION_LOCKS: u8 = 7;
const T_EVENTS: u8 = 8;
const T_END: u8 = 0;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), table-driven.
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

fn corrupt(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("snapshot: {what}"))
}

fn enc_key<K: bincode::Encode>(key: &K) -> Result<Vec<u8>, StorageError> {
    bincode::encode_to_vec(key, standard()).map_err(corrupt)
}

fn dec_key<K: bincode::Decode<()>>(bytes: &[u8]) -> Result<K, StorageError> {
    let (key, used) = bincode::decode_from_slice(bytes, standard()).map_err(corrupt)?;
    if used != bytes.len() {
        return Err(corrupt("trailing bytes in key"));
    }
    Ok(key)
}

/// Builds a snapshot.
struct Writer {
    out: Vec<u8>,
    count: u64,
}

impl Writer {
    fn new(index: u64, term: u64) -> Writer {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&term.to_le_bytes());
        Writer { out, count: 0 }
    }

    fn record(&mut self, table: u8, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        let klen = u32::try_from(key.len()).map_err(|_| corrupt("key too large"))?;
        let vlen = u32::try_from(value.len()).map_err(|_| corrupt("value too large"))?;
        self.out.push(table);
        self.out.extend_from_slice(&klen.to_le_bytes());
        self.out.extend_from_slice(key);
        self.out.extend_from_slice(&vlen.to_le_bytes());
        self.out.extend_from_slice(value);
        self.count += 1;
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.push(T_END);
        self.out.extend_from_slice(&self.count.to_le_bytes());
        let crc = crc32(&self.out);
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.out
    }
}

/// Dumps the state machine's tables as seen by `txn` (a consistent read transaction) into a
/// snapshot of (`index`, `term`), which must be the applied index and its term in `txn`.
pub fn dump(txn: &ReadTransaction, index: u64, term: u64) -> Result<Vec<u8>, StorageError> {
    let mut w = Writer::new(index, term);
    for item in txn.open_table(NODES)?.iter()? {
        let (k, v) = item?;
        let (parent, name) = k.value();
        w.record(T_NODES, &enc_key(&(parent, name))?, v.value())?;
    }
    for item in txn.open_table(SESSIONS)?.iter()? {
        let (k, v) = item?;
        w.record(T_SESSIONS, &enc_key(&k.value())?, v.value())?;
    }
    for item in txn.open_table(EPHEMERALS)?.iter()? {
        let (k, _) = item?;
        w.record(T_EPHEMERALS, &enc_key(&k.value())?, &[])?;
    }
    for item in txn.open_table(DEDUP)?.iter()? {
        let (k, v) = item?;
        w.record(T_DEDUP, &enc_key(&k.value())?, v.value())?;
    }
    for item in txn.open_table(FSM_META)?.iter()? {
        let (k, v) = item?;
        w.record(T_FSM_META, &enc_key(&k.value())?, v.value())?;
    }
    for item in txn.open_table(LOCKS)?.iter()? {
        let (k, v) = item?;
        w.record(T_LOCKS, &enc_key(&k.value())?, v.value())?;
    }
    for item in txn.open_table(SESSION_LOCKS)?.iter()? {
        let (k, _) = item?;
        w.record(T_SESSION_LOCKS, &enc_key(&k.value())?, &[])?;
    }
    for item in txn.open_table(EVENTS)?.iter()? {
        let (k, v) = item?;
        w.record(T_EVENTS, &enc_key(&k.value())?, v.value())?;
    }
    Ok(w.finish())
}

/// One record of a verified snapshot.
struct Record<'a> {
    table: u8,
    key: &'a [u8],
    value: &'a [u8],
}

/// Reads records of a snapshot whose framing has been verified.
struct Records<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> Records<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        let end = self.pos.checked_add(n).ok_or_else(|| corrupt("overflow"))?;
        let bytes = self
            .body
            .get(self.pos..end)
            .ok_or_else(|| corrupt("truncated record"))?;
        self.pos = end;
        Ok(bytes)
    }

    fn len(&mut self) -> Result<usize, StorageError> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        usize::try_from(n).map_err(corrupt)
    }

    /// The next record, or `None` at the end marker.
    fn next_record(&mut self) -> Result<Option<Record<'a>>, StorageError> {
        let table = self.take(1)?[0];
        if table == T_END {
            return Ok(None);
        }
        if !(T_NODES..=T_EVENTS).contains(&table) {
            return Err(corrupt(format!("unknown table id {table}")));
        }
        let klen = self.len()?;
        let key = self.take(klen)?;
        let vlen = self.len()?;
        let value = self.take(vlen)?;
        Ok(Some(Record { table, key, value }))
    }
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, StorageError> {
    let b: [u8; 8] = bytes
        .get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| corrupt("truncated"))?;
    Ok(u64::from_le_bytes(b))
}

/// Checks a complete snapshot: magic, version, (index, term), checksum, end marker and record
/// count. Returns the number of records.
pub fn verify(data: &[u8], index: u64, term: u64) -> Result<u64, StorageError> {
    if data.len() < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt("too short"));
    }
    if &data[..8] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
    if version != VERSION {
        return Err(corrupt(format!("unknown version {version}")));
    }
    let (got_index, got_term) = (u64_at(data, 12)?, u64_at(data, 20)?);
    if (got_index, got_term) != (index, term) {
        return Err(corrupt(format!(
            "is ({got_index}, {got_term}), expected ({index}, {term})"
        )));
    }
    let crc_at = data.len() - 4;
    let stored = u32::from_le_bytes([
        data[crc_at],
        data[crc_at + 1],
        data[crc_at + 2],
        data[crc_at + 3],
    ]);
    if crc32(&data[..crc_at]) != stored {
        return Err(corrupt("checksum mismatch"));
    }
    let count = u64_at(data, crc_at - 8)?;
    let mut records = Records {
        body: &data[..crc_at - 8],
        pos: HEADER_LEN,
    };
    let mut seen = 0u64;
    while records.next_record()?.is_some() {
        seen += 1;
    }
    if records.pos != crc_at - 8 || seen != count {
        return Err(corrupt("record count or end marker mismatch"));
    }
    Ok(count)
}

fn clear<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<(), StorageError> {
    txn.delete_table(def)?;
    txn.open_table(def)?;
    Ok(())
}

/// Replaces the state machine's tables in `txn` with the snapshot's contents. Verifies the
/// snapshot first; on error the caller must drop (abort) the transaction.
pub fn restore(
    txn: &WriteTransaction,
    data: &[u8],
    index: u64,
    term: u64,
) -> Result<(), StorageError> {
    verify(data, index, term)?;
    clear(txn, NODES)?;
    clear(txn, SESSIONS)?;
    clear(txn, EPHEMERALS)?;
    clear(txn, DEDUP)?;
    clear(txn, FSM_META)?;
    clear(txn, LOCKS)?;
    clear(txn, SESSION_LOCKS)?;
    clear(txn, EVENTS)?;
    let mut nodes = txn.open_table(NODES)?;
    let mut sessions = txn.open_table(SESSIONS)?;
    let mut ephemerals = txn.open_table(EPHEMERALS)?;
    let mut dedup = txn.open_table(DEDUP)?;
    let mut meta = txn.open_table(FSM_META)?;
    let mut locks = txn.open_table(LOCKS)?;
    let mut session_locks = txn.open_table(SESSION_LOCKS)?;
    let mut events = txn.open_table(EVENTS)?;
    let mut records = Records {
        body: &data[..data.len() - 12],
        pos: HEADER_LEN,
    };
    while let Some(r) = records.next_record()? {
        let v = r.value;
        match r.table {
            T_NODES => {
                let (p, n): (String, String) = dec_key(r.key)?;
                nodes.insert((p.as_str(), n.as_str()), v)?;
            }
            T_SESSIONS => {
                sessions.insert(dec_key::<u64>(r.key)?, v)?;
            }
            T_EPHEMERALS => {
                let (s, p): (u64, String) = dec_key(r.key)?;
                ephemerals.insert((s, p.as_str()), ())?;
            }
            T_DEDUP => {
                dedup.insert(dec_key::<(u64, u64)>(r.key)?, v)?;
            }
            T_FSM_META => {
                let k: String = dec_key(r.key)?;
                meta.insert(k.as_str(), v)?;
            }
            T_LOCKS => {
                let k: String = dec_key(r.key)?;
                locks.insert(k.as_str(), v)?;
            }
            T_SESSION_LOCKS => {
                let (s, n, a): (u64, String, u64) = dec_key(r.key)?;
                session_locks.insert((s, n.as_str(), a), ())?;
            }
            T_EVENTS => {
                events.insert(dec_key::<u64>(r.key)?, v)?;
            }
            other => return Err(corrupt(format!("unknown table id {other}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn verify_rejects_damage() {
        let mut w = Writer::new(5, 2);
        w.record(T_SESSIONS, &enc_key(&7u64).unwrap(), b"abc")
            .unwrap();
        let data = w.finish();
        assert_eq!(verify(&data, 5, 2).unwrap(), 1);
        assert!(verify(&data, 5, 3).is_err(), "wrong term");
        assert!(verify(&data[..data.len() - 1], 5, 2).is_err(), "truncated");
        for i in 0..data.len() {
            let mut bad = data.clone();
            bad[i] ^= 0x40;
            assert!(verify(&bad, 5, 2).is_err(), "flipped byte {i}");
        }
    }
}
