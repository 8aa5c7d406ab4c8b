#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lumen_fuzz::prometheus_api(data));
