#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lumen_fuzz::authorization(data));
