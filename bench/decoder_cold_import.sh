#!/usr/bin/env bash
# Usage: BASE=/path/to/old/checkout bash bench/decoder_cold_import.sh
# Fresh-interpreter import of the query path's decoder: base tree vs branch, alternating, 5 each.
steal() { awk '/^cpu /{print $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
s0=$(steal)
for i in 1 2 3 4 5; do
  (cd "${BASE:?set BASE to a checkout of the tree before the split}" && /usr/bin/time -f "base %e s" python -c "import pipeline.similarity_index, transforms.decode, sys; print('beam', any(m.startswith('apache_beam') for m in sys.modules))")
  (cd "$(dirname "$0")/.." && /usr/bin/time -f "new %e s" python -c "import pipeline.similarity_index, pipeline.image_decode, sys; print('beam', any(m.startswith('apache_beam') for m in sys.modules))")
done 2>&1
s1=$(steal)
echo "steal: $(( $(echo $s1|cut -d' ' -f1) - $(echo $s0|cut -d' ' -f1) )) of $(( $(echo $s1|cut -d' ' -f2) - $(echo $s0|cut -d' ' -f2) )) ticks"
