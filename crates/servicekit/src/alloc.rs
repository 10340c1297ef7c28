//! The memory allocator every chatfleet binary uses: mimalloc instead of glibc's
//! malloc.
//!
//! Why this module exists: a message's path is made of many small, short-lived
//! allocations (JSON and BSON documents, headers, futures), freed on other worker
//! threads than the ones that made them. Profiled at 500 msg/s, glibc's allocator
//! took about a quarter of chatpersistence's CPU (`_int_malloc`, `_int_free`,
//! `malloc_consolidate`, `unlink_chunk`); mimalloc's per-thread free lists make
//! the same work a few instructions each (docs/benchmarks.md, "CPU per message").
//! Declared once here, so every binary linking servicekit gets it.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
