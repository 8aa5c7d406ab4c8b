#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lumen_fuzz::flight_do_put(data));
