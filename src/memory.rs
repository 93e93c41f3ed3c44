//! Gives memory freed after a config load back to the OS. glibc's malloc keeps freed pages
//! in its arenas: parsing and compiling a big config peaks at several times what the running
//! config needs, and without this the peak stays resident (and grows with every reload, as
//! each load lands in other arenas).

/// Returns free heap pages to the OS (glibc `malloc_trim`); a no-op on other allocators.
/// Takes a few milliseconds on a large heap: call it off the request path, after a load.
#[allow(unsafe_code)]
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims on a blocking thread, so the caller's runtime thread is not held up.
pub fn release_freed_soon() {
    tokio::task::spawn_blocking(release_freed);
}
