// Greedy non-maximum suppression within groups (class, image) on the CPU.
//
// torchvision's batched_nms runs, on the CPU above 4000 boxes, one nms call per group from a
// Python loop (EfficientDet keeps 5000 candidates over 90 classes: 70-90 calls per image), or
// else one nms over all boxes with the groups shifted apart, which compares every pair. Here
// each box is compared only with the boxes already kept in its own group. The overlap is
// computed as torchvision's nms kernel computes it, so the same boxes are kept. Loaded through
// ctypes by detector/layers/cpu_kernels.py.
#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

extern "C" {

// boxes: (n, 4) x1, y1, x2, y2 sorted by decreasing score; groups: (n,) group ids; keep: (n,)
// set to 1 for the boxes kept, 0 for the suppressed ones.
void detector_grouped_nms(const float* boxes, const int64_t* groups, int64_t n,
                          double iou_threshold, uint8_t* keep) {
  std::unordered_map<int64_t, std::vector<int64_t>> kept;  // group -> kept boxes, best first
  std::vector<float> areas(n);
  for (int64_t i = 0; i < n; ++i) {
    const float* b = boxes + 4 * i;
    areas[i] = (b[2] - b[0]) * (b[3] - b[1]);
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* bj = boxes + 4 * j;
    std::vector<int64_t>& group = kept[groups[j]];
    bool suppressed = false;
    for (const int64_t i : group) {
      const float* bi = boxes + 4 * i;
      const float xx1 = std::max(bi[0], bj[0]), yy1 = std::max(bi[1], bj[1]);
      const float xx2 = std::min(bi[2], bj[2]), yy2 = std::min(bi[3], bj[3]);
      const float w = std::max(0.0f, xx2 - xx1), h = std::max(0.0f, yy2 - yy1);
      const float inter = w * h;
      const float overlap = inter / (areas[i] + areas[j] - inter);
      if (overlap > iou_threshold) {
        suppressed = true;
        break;
      }
    }
    keep[j] = suppressed ? 0 : 1;
    if (!suppressed) group.push_back(j);
  }
}

}  // extern "C"
