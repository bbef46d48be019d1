# Injected into llama.cpp's CMake project (CMAKE_PROJECT_llama.cpp_INCLUDE) when the test set-up builds
# llama-cpp-python: llama-cpp-python forces llama.cpp's `common` library on, but its Python bindings load
# only libllama and ggml, and `common` is about 40 % of the compile. A normal variable shadows the
# forced cache entry, and llama.cpp's option() then keeps it (policy CMP0077).
set(LLAMA_BUILD_COMMON OFF)
