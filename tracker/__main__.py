from tracker._console import main

main()
