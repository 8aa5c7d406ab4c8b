//! Arrow IPC that arrives from outside the process (Flight `DoPut` to the
//! collector, Flight SQL parameters to the query service): what arrow's
//! decoder trusts and a server must check first.

/// Checks that every buffer of one IPC message lies inside its body.
///
/// Arrow's decoder slices each buffer out of the body at the offset and
/// length the header gives, and panics when they run past its end (found
/// by fuzzing the collector's `DoPut`); a server checks first and answers
/// with the protocol's error. A header that does not parse, or is not a
/// batch, is left to the decoder, which refuses it with an error.
pub fn check_buffers(header: &[u8], body: &[u8]) -> Result<(), String> {
    let Ok(message) = arrow::ipc::root_as_message(header) else {
        return Ok(());
    };
    let batch = message
        .header_as_record_batch()
        .or_else(|| message.header_as_dictionary_batch().and_then(|d| d.data()));
    let Some(batch) = batch else {
        return Ok(());
    };
    for (i, buffer) in batch.buffers().into_iter().flatten().enumerate() {
        let (offset, length) = (buffer.offset(), buffer.length());
        let end = offset.checked_add(length);
        if offset < 0 || length < 0 || end.is_none_or(|end| end as u64 > body.len() as u64) {
            return Err(format!(
                "buffer {i} (offset {offset}, length {length}) lies outside the message body of {} bytes",
                body.len()
            ));
        }
    }
    Ok(())
}

/// How many bytes the compressed buffers of one IPC message say they hold
/// once decompressed; 0 for an uncompressed message, and for a header that
/// does not parse (the decoder refuses that itself).
///
/// Arrow IPC may compress each buffer of a batch (LZ4, zstd); each then
/// starts with its decompressed length, and arrow's decoder allocates that
/// much before it decompresses anything. A few bytes declaring a terabyte
/// abort the process ("memory allocation of 1099511627776 bytes failed"),
/// so a server adds these up over a request and holds them to a limit
/// before decoding.
pub fn declared_decompressed_size(header: &[u8], body: &[u8]) -> u64 {
    let Ok(message) = arrow::ipc::root_as_message(header) else {
        return 0;
    };
    let batch = message
        .header_as_record_batch()
        .or_else(|| message.header_as_dictionary_batch().and_then(|d| d.data()));
    let Some(batch) = batch.filter(|b| b.compression().is_some()) else {
        return 0;
    };
    let mut declared: u64 = 0;
    for buffer in batch.buffers().into_iter().flatten() {
        // An empty buffer (no nulls, say) has no prefix: the bytes at its
        // offset are the next buffer's.
        if buffer.length() < 8 {
            continue;
        }
        let start = usize::try_from(buffer.offset()).unwrap_or(usize::MAX);
        let prefix = start
            .checked_add(8)
            .and_then(|end| body.get(start..end))
            .and_then(|p| <[u8; 8]>::try_from(p).ok())
            .map(i64::from_le_bytes);
        // -1: stored uncompressed, as long as the buffer itself.
        let length = match prefix {
            Some(-1) | None => buffer.length(),
            Some(n) => n,
        };
        declared = declared.saturating_add(length.max(0) as u64);
    }
    declared
}

thread_local! {
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `decode` (arrow's IPC decoder over bytes from outside), turning a
/// panic into an error. The decoder trusts the header: a null bitmap
/// shorter than the array it declares, say, makes it panic rather than
/// fail (found by fuzzing the collector's `DoPut`). It works on owned
/// bytes and shares no state, so nothing is left half-changed.
pub fn guarded<T>(decode: impl FnOnce() -> T) -> Result<T, String> {
    DECODING.with(|d| d.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode));
    DECODING.with(|d| d.set(false));
    result.map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the decoder gave up");
        format!("inconsistent Arrow IPC: {what}")
    })
}

/// Whether this thread is inside [`guarded`], where a panic is caught (for
/// a panic hook that would otherwise treat it as a crash).
pub fn decoding() -> bool {
    DECODING.with(|d| d.get())
}
