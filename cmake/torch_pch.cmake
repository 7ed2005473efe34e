# Precompiled LibTorch headers, built once and reused by every target that uses
# LibTorch (included from the top-level CMakeLists.txt after all targets exist).
#
# Parsing ATen/ATen.h and the torch::nn headers takes about 12 of the 16 s that
# a typical torch translation unit needs on one core of the 2-core development
# machine; with the precompiled header it takes about 3 s to load. About 50 of
# our translation units use LibTorch, so this saves roughly 6 minutes of CPU
# time in a clean build. Turn it off with -DSF_PRECOMPILED_HEADERS=OFF.
#
# The header set is the union of the heavy headers our sources include. It is
# force-included (-include) ahead of each source of the reusing targets, so a
# source still has to include what it uses: the build without precompiled
# headers checks that.

set(SF_PCH_SOURCE ${CMAKE_BINARY_DIR}/sf_torch_pch.cc)
if(NOT EXISTS ${SF_PCH_SOURCE})
  file(WRITE ${SF_PCH_SOURCE} "// The precompiled LibTorch headers' own translation unit (cmake/torch_pch.cmake).\n")
endif()
add_library(sf_torch_pch OBJECT ${SF_PCH_SOURCE})
target_link_libraries(sf_torch_pch PRIVATE ${TORCH_LIBRARIES})
sf_use_system_protobuf(sf_torch_pch)
target_precompile_headers(sf_torch_pch PRIVATE
  <ATen/ATen.h>
  <torch/nn/module.h>
  <torch/nn/modules/linear.h>)

# Every target defined below DIR, recursively.
function(_sf_targets_below dir out)
  get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
  get_property(subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  foreach(sub IN LISTS subdirs)
    _sf_targets_below(${sub} below)
    list(APPEND targets ${below})
  endforeach()
  set(${out} ${targets} PARENT_SCOPE)
endfunction()

# Whether TARGET links LibTorch, directly or through our own libraries. Results
# are memoised in global properties.
function(_sf_links_torch target out)
  get_property(known GLOBAL PROPERTY _SF_LINKS_TORCH_${target} SET)
  if(known)
    get_property(result GLOBAL PROPERTY _SF_LINKS_TORCH_${target})
    set(${out} ${result} PARENT_SCOPE)
    return()
  endif()
  set(result FALSE)
  get_target_property(type ${target} TYPE)
  set(libs)
  if(NOT type STREQUAL "INTERFACE_LIBRARY")
    get_target_property(direct ${target} LINK_LIBRARIES)
    if(direct)
      list(APPEND libs ${direct})
    endif()
  endif()
  get_target_property(interface ${target} INTERFACE_LINK_LIBRARIES)
  if(interface)
    list(APPEND libs ${interface})
  endif()
  foreach(lib IN LISTS libs)
    string(REGEX REPLACE "^\\$<LINK_ONLY:(.*)>$" "\\1" lib "${lib}")
    if(lib STREQUAL "torch")
      set(result TRUE)
    elseif(lib MATCHES "^sf_" AND TARGET ${lib})
      _sf_links_torch(${lib} below)
      if(below)
        set(result TRUE)
      endif()
    endif()
  endforeach()
  set_property(GLOBAL PROPERTY _SF_LINKS_TORCH_${target} ${result})
  set(${out} ${result} PARENT_SCOPE)
endfunction()

_sf_targets_below(${PROJECT_SOURCE_DIR} all_targets)
set(pch_users)
foreach(target IN LISTS all_targets)
  if(target STREQUAL "sf_torch_pch")
    continue()
  endif()
  get_target_property(type ${target} TYPE)
  if(NOT type MATCHES "^(EXECUTABLE|STATIC_LIBRARY|SHARED_LIBRARY|OBJECT_LIBRARY)$")
    continue()
  endif()
  get_target_property(sources ${target} SOURCES)
  list(FILTER sources INCLUDE REGEX "\\.(cc|cpp)$")
  if(NOT sources)
    continue()
  endif()
  _sf_links_torch(${target} uses_torch)
  if(uses_torch)
    target_precompile_headers(${target} REUSE_FROM sf_torch_pch)
    list(APPEND pch_users ${target})
  endif()
endforeach()
list(LENGTH pch_users n_pch_users)
message(STATUS "sparseflash: precompiled LibTorch headers for ${n_pch_users} targets")
