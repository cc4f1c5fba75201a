//! How many heap bytes a value takes once decoded, so the decoded-value cache can be
//! bounded by what it really holds rather than by the (several times smaller) encoded
//! size of its values.
//!
//! [`Metered`] wraps the process's global allocator and keeps, per thread, the bytes
//! allocated minus the bytes freed. [`retained`] runs a closure and returns what it left
//! allocated: for a decode, the heap size of the decoded value. Without the wrapper
//! installed (unit tests, the in-memory driver), [`retained`] answers `None` and callers
//! fall back to the encoded size.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// A global allocator that meters the bytes each thread keeps allocated:
/// `#[global_allocator] static A: Metered<mimalloc::MiMalloc> = Metered(mimalloc::MiMalloc);`
pub struct Metered<A>(pub A);

thread_local! {
    /// Bytes allocated minus bytes freed by this thread (wraps freely: only differences
    /// are read).
    static NET: Cell<isize> = const { Cell::new(0) };
}

/// Set once the metered allocator has served an allocation.
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn add(bytes: isize) {
    // `try_with`: an allocation made while the thread is being torn down is not metered.
    let _ = NET.try_with(|net| net.set(net.get().wrapping_add(bytes)));
}

// SAFETY: every call is forwarded unchanged to the wrapped allocator; the bookkeeping
// touches only a thread-local integer and allocates nothing.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Metered<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        self.0.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        self.0.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize));
        self.0.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize);
        self.0.realloc(ptr, layout, new_size)
    }
}

impl<A> Metered<A> {
    /// Mark the meter as live; call once at start-up (the allocator cannot tell it is
    /// the global one by itself).
    pub fn install(&self) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// Whether the metered allocator is installed.
pub fn metered() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// `f()`, and the heap bytes it left allocated on this thread (`None` without the
/// metered allocator).
pub fn retained<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    if !metered() {
        return (f(), None);
    }
    let before = NET.with(Cell::get);
    let result = f();
    let after = NET.with(Cell::get);
    (result, Some(after.wrapping_sub(before).max(0) as usize))
}
