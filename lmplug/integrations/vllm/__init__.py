"""vLLM integration: moving KV between vLLM's paged KV cache and lmplug chunks.

The KV connector itself comes with the vLLM issue; :mod:`.paged` already holds the
vectorised gather/scatter through vLLM's slot mapping for its CPU and CUDA layouts. This
package does not import vLLM.
"""
