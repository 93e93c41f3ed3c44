//! Gives memory freed after a config load back to the OS. glibc's malloc keeps freed pages
//! in its arenas: parsing and compiling a big config peaks at several times what the running
//! config needs, and without this the peak stays resident (and grows with every reload, as
//! each load lands in other arenas).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Returns free heap pages to the OS (glibc `malloc_trim`); a no-op on other allocators.
/// Takes milliseconds on a large heap, holding each arena's lock meanwhile: call it off the
/// request path, after a load, and not often.
#[allow(unsafe_code)]
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations at least this big get pages of their own (see [`keep_big_allocations_apart`]).
const OWN_PAGES_FROM: usize = 256 * 1024;

/// Makes glibc give big allocations (the config text, the big vectors of a load) pages of
/// their own, returned to the OS when freed. By default glibc raises that threshold each
/// time such a block is freed, up to 32 MiB, after which every reload's texts and vectors
/// land in the heap among long-lived allocations, leaving holes no trim can return: RSS then
/// wanders from one reload to the next. Call once, at startup.
#[allow(unsafe_code)]
pub fn keep_big_allocations_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_PAGES_FROM as libc::c_int);
    }
}

static PENDING: AtomicBool = AtomicBool::new(false);

/// How long a trim waits, so that a burst of loads (xDS pushes several types in a row) is
/// followed by one trim.
const COALESCE: Duration = Duration::from_secs(1);

/// Trims once, on a blocking thread, shortly after the latest of a burst of calls.
pub fn release_freed_soon() {
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(COALESCE).await;
        PENDING.store(false, Ordering::Release);
        let _ = tokio::task::spawn_blocking(release_freed).await;
    });
}
