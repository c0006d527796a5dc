//! BPF arrays created BPF_F_MMAPABLE, mapped into the agent's memory: a ring is written with a
//! memcpy instead of a syscall per slot, and a double-buffered value is flipped with one
//! aligned store, which a syscall's copy does not promise.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Map, MapData};
use lb_common::DoubleBuffer;

/// An mmapable array map of `T` seen as a slice. The agent is its only writer.
pub struct MappedArray<T> {
    ptr: NonNull<T>,
    len: usize,
    _map: MapData,
}

// The mapping is owned by this struct and only reached through &self / &mut self.
unsafe impl<T: Send> Send for MappedArray<T> {}
unsafe impl<T: Sync> Sync for MappedArray<T> {}

impl<T: Copy> MappedArray<T> {
    /// Maps the array `name`; its value size must be that of `T` (a multiple of 8, as the
    /// kernel pads elements to 8 bytes).
    pub fn map(map: Map, name: &str) -> Result<Self> {
        let Map::Array(data) = map else {
            bail!("{name} is not an array map");
        };
        let info = data.info().with_context(|| format!("inspecting {name}"))?;
        let size = size_of::<T>();
        if !size.is_multiple_of(8) || info.value_size() as usize != size {
            bail!(
                "{name} holds {}-byte values, this agent expects {size}",
                info.value_size()
            );
        }
        let len = info.max_entries() as usize;
        let fd = data.fd().as_fd();
        // SAFETY: a shared mapping of an mmapable BPF array; length matches the map's size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of {name} (is it BPF_F_MMAPABLE?)"));
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).context("mmap returned null")?,
            len,
            _map: data,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[T] {
        // SAFETY: the mapping holds `len` elements of T for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above; &mut self makes this the only writer in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> MappedArray<DoubleBuffer<T>> {
    /// The current copy of entry `index`.
    pub fn current(&self, index: u32) -> Option<T> {
        let entry = self.as_slice().get(index as usize)?;
        Some(entry.halves[(self.flip_word(index)?.load(Ordering::Acquire) & 1) as usize])
    }

    /// Writes the idle copy of entry `index` and makes it current. The caller makes sure a
    /// grace period passed since the entry last flipped: readers may still hold the idle
    /// copy until then.
    pub fn replace(&mut self, index: u32, value: &T) -> Result<()> {
        let Some(word) = self.flip_word(index) else {
            bail!("index {index} past the map's {} entries", self.len);
        };
        let idle = (word.load(Ordering::Acquire) & 1) ^ 1;
        // SAFETY: in bounds (flip_word checked); the data path does not read the idle copy.
        unsafe {
            let entry = self.ptr.as_ptr().add(index as usize);
            std::ptr::write_volatile(&raw mut (*entry).halves[idle as usize], *value);
        }
        // Release: the copy is complete in memory before a reader can pick it.
        word.store(idle, Ordering::Release);
        Ok(())
    }

    fn flip_word(&self, index: u32) -> Option<&AtomicU32> {
        if index as usize >= self.len {
            return None;
        }
        // SAFETY: in bounds; `active` is a naturally aligned u32 shared with the kernel.
        unsafe {
            let entry = self.ptr.as_ptr().add(index as usize);
            Some(AtomicU32::from_ptr(&raw mut (*entry).active))
        }
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * size_of::<T>()) };
    }
}

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Waits for an RCU grace period: membarrier(MEMBARRIER_CMD_GLOBAL) runs synchronize_rcu()
/// in the kernel, and BPF programs at XDP and TC run inside RCU read-side sections, so every
/// packet that started before the call has finished. Kernels with nohz_full refuse the
/// command; there, a pause far longer than any packet's run stands in.
pub fn grace_period() -> Result<()> {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let supported = *SUPPORTED.get_or_init(|| {
        // SAFETY: membarrier(2) with no pointer arguments.
        let mask = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
        mask > 0 && mask & i64::from(MEMBARRIER_CMD_GLOBAL) != 0
    });
    if supported {
        // SAFETY: as above.
        let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if rc == 0 {
            return Ok(());
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    Ok(())
}
