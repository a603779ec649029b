//! A redb storage backend for crash tests: it keeps what a real disk would keep across a
//! power loss, and nothing more (DESIGN §3a.15). Writes land in a volatile image; only
//! `sync_data` makes them durable. [`LossyBackend::crash_image`] returns the durable image at
//! any moment, and [`LossyBackend::from_image`] starts a "rebooted" backend from it. A SIGKILL
//! test cannot catch a missing fsync (the page cache survives it); this can.

use std::sync::{Arc, Mutex, MutexGuard};

use redb::StorageBackend;

/// The error type of `StorageBackend`'s methods (without redb's experimental API).
type BackendIoError = std::io::Error;

#[derive(Debug, Default)]
struct Disk {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    /// Byte ranges written since the last sync.
    dirty: Vec<(usize, usize)>,
    syncs: u64,
}

/// In-memory backend that drops unsynced writes on a simulated crash. Clones share the disk.
#[derive(Debug, Clone, Default)]
pub struct LossyBackend {
    disk: Arc<Mutex<Disk>>,
}

impl LossyBackend {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// A disk holding `image`, as after a reboot.
    pub fn from_image(image: Vec<u8>) -> Self {
        let disk = Disk {
            volatile: image.clone(),
            durable: image,
            dirty: Vec::new(),
            syncs: 0,
        };
        LossyBackend {
            disk: Arc::new(Mutex::new(disk)),
        }
    }

    /// What would survive a crash right now: the contents as of the last completed sync.
    pub fn crash_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// Number of completed syncs.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        // A panic while holding the lock leaves consistent bytes; keep going.
        self.disk
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn io_error(message: &str) -> BackendIoError {
    std::io::Error::other(message.to_string())
}

impl StorageBackend for LossyBackend {
    fn len(&self) -> Result<u64, BackendIoError> {
        Ok(self.lock().volatile.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        let disk = self.lock();
        let start = offset as usize;
        let end = start
            .checked_add(out.len())
            .ok_or_else(|| io_error("read overflow"))?;
        if end > disk.volatile.len() {
            return Err(io_error("read past end"));
        }
        out.copy_from_slice(&disk.volatile[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        let mut disk = self.lock();
        let old = disk.volatile.len();
        disk.volatile.resize(len as usize, 0);
        if (len as usize) > old {
            disk.dirty.push((old, len as usize));
        }
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        let mut disk = self.lock();
        let len = disk.volatile.len();
        let mut durable = std::mem::take(&mut disk.durable);
        durable.resize(len, 0);
        for (start, end) in std::mem::take(&mut disk.dirty) {
            let end = end.min(len);
            if start < end {
                durable[start..end].copy_from_slice(&disk.volatile[start..end]);
            }
        }
        disk.durable = durable;
        disk.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        let mut disk = self.lock();
        let start = offset as usize;
        let end = start
            .checked_add(data.len())
            .ok_or_else(|| io_error("write overflow"))?;
        if end > disk.volatile.len() {
            return Err(io_error("write past end"));
        }
        disk.volatile[start..end].copy_from_slice(data);
        disk.dirty.push((start, end));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost_and_synced_ones_kept() {
        let backend = LossyBackend::new();
        backend.set_len(8).unwrap();
        backend.write(0, b"abcd").unwrap();
        backend.sync_data().unwrap();
        backend.write(4, b"efgh").unwrap();
        let image = backend.crash_image();
        assert_eq!(&image, b"abcd\0\0\0\0");
        let rebooted = LossyBackend::from_image(image);
        let mut out = [0u8; 8];
        rebooted.read(0, &mut out).unwrap();
        assert_eq!(&out, b"abcd\0\0\0\0");
    }
}
