//! Network device lookups shared by the loader and the agent.

/// The interface's index; 0 if there is none of that name.
pub fn ifindex(interface: &str) -> u32 {
    let Ok(name) = std::ffi::CString::new(interface) else {
        return 0;
    };
    // SAFETY: a valid C string; if_nametoindex has no other preconditions.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}
