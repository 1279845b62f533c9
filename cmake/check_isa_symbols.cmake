# Fails the build when an AVX2 object defines a weak (linker-merged) symbol outside ucgm::avx2::.
# The linker keeps one copy of each weak symbol for the whole module: an AVX2 copy of, say, a
# std::vector member would then also serve the baseline build and crash CPUs without AVX2.
# Usage: cmake -DNM=<nm> -DOBJECTS="<a.o;b.o>" -P check_isa_symbols.cmake
set(_bad "")
foreach(obj IN LISTS OBJECTS)
  execute_process(COMMAND "${NM}" -C --defined-only "${obj}" OUTPUT_VARIABLE _syms RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(WARNING "check_isa_symbols: ${NM} failed on ${obj}; not checked")
    continue()
  endif()
  string(REPLACE "\n" ";" _lines "${_syms}")
  foreach(line IN LISTS _lines)
    if(line MATCHES " [WVuw] " AND NOT line MATCHES "ucgm::avx2::|DW\\.ref\\.__gxx_personality_v0")
      string(APPEND _bad "\n  ${obj}: ${line}")
    endif()
  endforeach()
endforeach()
if(_bad)
  message(FATAL_ERROR "AVX2 objects define shared weak symbols outside ucgm::avx2:: "
                      "(move the code into UCGM_NAMESPACE_BEGIN or make it static):${_bad}")
endif()
